#!/usr/bin/env python
"""
Generate the toy LVIS v1 demo set (the one registered as lvis_v1_toy_train / lvis_v1_toy_val).

    python datasets/prepare_toy_lvis.py [--root DIR] [--seed N]

The set lands in DIR/lvis_v1_toy/ (DIR defaults to $DETECTRON2_DATASETS, else ./datasets). drcl2
generates it by itself the first time it is used; this command does it ahead of time, or with
another seed or size into another folder. An existing set is kept, never overwritten.
"""
import argparse
import dataclasses
import os
import time

from drcl2.data.toy_lvis import ToyLVISSpec, ensure_toy_lvis, toy_lvis_categories


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="dataset root (default: $DETECTRON2_DATASETS, else ./datasets)")
    for field in dataclasses.fields(ToyLVISSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default, help=f"(default: {field.default})")
    args = parser.parse_args()
    spec = ToyLVISSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToyLVISSpec)})

    start = time.perf_counter()
    paths = ensure_toy_lvis(args.root, spec)
    groups = [c["frequency"] for c in toy_lvis_categories(spec)]
    print(
        f"Toy LVIS v1 set ready in {paths['image_root']} ({time.perf_counter() - start:.1f} s): "
        f"{spec.num_train_images} train / {spec.num_val_images} val / {spec.num_test_images} test images, {len(groups)} classes "
        f"(rare {groups.count('r')}, common {groups.count('c')}, frequent {groups.count('f')})"
    )


if __name__ == "__main__":
    main()
