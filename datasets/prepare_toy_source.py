#!/usr/bin/env python
"""
Generate the toy source classification set (the one registered as toy_source_train / toy_source_val),
the stand-in for ImageNet of the toy study: the backbone is pre-trained on it with
`python -m drcl2.tools.source_pretrain` before 2DRCL pre-training or fine-tuning.

    python datasets/prepare_toy_source.py [--root DIR] [--seed N]

The set lands in DIR/toy_source/ (DIR defaults to $DETECTRON2_DATASETS, else ./datasets). drcl2
generates it by itself the first time it is used; this command does it ahead of time, or with
another seed or size into another folder. An existing set is kept, never overwritten.
"""
import argparse
import dataclasses
import os
import sys
import time

from drcl2.data.generated.toy_source import SOURCE_CLASSES, ToySourceSpec, ensure_toy_source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="dataset root (default: $DETECTRON2_DATASETS, else ./datasets)")
    for field in dataclasses.fields(ToySourceSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default, help=f"(default: {field.default})")
    args = parser.parse_args(argv)
    spec = ToySourceSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToySourceSpec)})

    start = time.perf_counter()
    try:
        paths = ensure_toy_source(args.root, spec)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"Toy source set ready in {paths['image_root']} ({time.perf_counter() - start:.1f} s): "
        f"{len(SOURCE_CLASSES)} classes x ({spec.num_train_per_class} train + "
        f"{spec.num_val_per_class} val) images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
