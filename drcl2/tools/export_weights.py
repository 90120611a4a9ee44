"""
Export the fine-tuning weights of a pre-training checkpoint (2DRCL, or a detector trained as the
supervised pre-training baseline):

    python -m drcl2.tools.export_weights output/pretrain_2drcl/model_final.pth \\
        output/pretrain_2drcl/model_final_finetune.pth

keeps the online ``backbone.*``, ``proposal_generator.*`` and ``roi_heads.box_head.*`` (names
unchanged); fine-tune with ``MODEL.WEIGHTS <dst>``.
"""

import argparse
import sys

from detectron2.utils.logger import setup_logger

from ..export import export_finetune_weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.export_weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", help="pre-training checkpoint (model_*.pth of a DRCL2 or detector run)"
    )
    parser.add_argument("dst", help="where to write the fine-tuning weights (.pth)")
    args = parser.parse_args(argv)
    setup_logger(name="drcl2")
    try:
        state = export_finetune_weights(args.src, args.dst)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(state)} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
