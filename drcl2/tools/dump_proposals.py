"""
Make the class-agnostic proposals of 2DRCL's LCL boxes (``MODEL.DRCL2.LCL.BOX_SOURCE:
"proposals"``): run an RPN-only detector (``MODEL.META_ARCHITECTURE: "ProposalNetwork"``) over a
dataset and write detectron2's proposal-file format (a pickle with ``ids``, ``boxes`` [R, 4]
XYXY_ABS in the original image, ``objectness_logits`` [R] and ``bbox_mode``), which
``DATASETS.PROPOSAL_FILES_TRAIN`` reads:

    python -m drcl2.tools.dump_proposals --config-file configs/proposals/rpn_R_50_FPN_1x.yaml \\
        MODEL.WEIGHTS output/proposals/rpn_R_50_FPN_1x/model_final.pth \\
        --dataset lvis_v1_train --output output/proposals/lvis_v1_train_rpn_R_50_FPN_1x.pkl
        --num-gpus 8

Images are resized as at test time (``INPUT.MIN_SIZE_TEST``); each image keeps the RPN's
``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals. Other ``KEY VALUE`` pairs override the config.
"""

import argparse
import logging
import os
import pickle
import sys
from typing import Dict, List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.engine import launch
from detectron2.evaluation import inference_context
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from ..config import load_config
from ..data.datasets import check_dataset_files

logger = logging.getLogger("drcl2.tools.dump_proposals")

__all__ = ["dump_proposals", "main"]


@torch.no_grad()
def dump_proposals(model: torch.nn.Module, data_loader, progress: bool = True) -> Dict[str, list]:
    """
    The proposals of ``model`` on the images of ``data_loader`` (this process's share).

    Args:
        model: a detectron2 model whose inference outputs hold ``"proposals"``
            (``Instances(proposal_boxes, objectness_logits)`` in the original image, as
            :class:`ProposalNetwork` returns).
        data_loader: a detectron2 test loader (dicts with ``image_id``, ``height``, ``width``).
        progress: show a progress bar.

    Returns:
        ``{"ids": [image_id], "boxes": [ndarray[R, 4] float32], "objectness_logits": [ndarray[R]
        float32]}``, one entry per image, boxes XYXY_ABS by decreasing objectness.
    """
    out = {"ids": [], "boxes": [], "objectness_logits": []}
    with inference_context(model):
        for inputs in tqdm(
            data_loader, total=len(data_loader), disable=not progress, desc="proposals"
        ):
            for x, result in zip(inputs, model(inputs)):
                if "proposals" not in result:
                    raise ValueError(
                        f"dump_proposals: the model returned {sorted(result)}, no 'proposals'. Use "
                        "an RPN-only config (MODEL.META_ARCHITECTURE: 'ProposalNetwork', e.g. "
                        "configs/proposals/rpn_R_50_FPN_1x.yaml)."
                    )
                p = result["proposals"].to("cpu")
                logits = p.objectness_logits.float()
                order = torch.argsort(logits, descending=True, stable=True)
                out["ids"].append(x["image_id"])
                out["boxes"].append(p.proposal_boxes.tensor[order].float().numpy())
                out["objectness_logits"].append(logits[order].numpy())
    return out


def _run(args, opts: List[str]) -> None:
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    if comm.is_main_process():
        setup_logger(name="drcl2")
    check_dataset_files([args.dataset])
    if args.dataset not in DatasetCatalog.list():
        raise ValueError(f"--dataset {args.dataset!r} is not a registered dataset.")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loader = build_detection_test_loader(cfg, args.dataset)
    local = dump_proposals(model, loader, progress=comm.is_main_process())
    parts = comm.gather(local, dst=0)  # every process's share (image ids are disjoint)
    if not comm.is_main_process():
        return
    merged = {k: [v for part in parts for v in part[k]] for k in local}
    merged["bbox_mode"] = int(BoxMode.XYXY_ABS)
    PathManager.mkdirs(os.path.dirname(os.path.abspath(args.output)))
    with PathManager.open(args.output, "wb") as f:
        pickle.dump(merged, f, protocol=pickle.HIGHEST_PROTOCOL)
    counts = np.array([len(b) for b in merged["boxes"]])
    logger.info(
        f"wrote proposals of {len(counts)} images of {args.dataset} to {args.output} "
        f"({counts.mean() if len(counts) else 0:.1f} per image)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.dump_proposals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="an RPN-only config (ProposalNetwork)")
    parser.add_argument(
        "--dataset", required=True, help="registered dataset name (e.g. lvis_v1_train)"
    )
    parser.add_argument("--output", required=True, help="the proposal file to write (.pkl)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument(
        "--dist-url", default="auto", help="initialization URL for several processes"
    )
    args, opts = parser.parse_known_args(argv)
    unknown = [o for o in opts if o.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {unknown} (config overrides are KEY VALUE pairs)")
    if len(opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs; got {opts}")
    try:
        launch(
            _run,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args, opts),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
