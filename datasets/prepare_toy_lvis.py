#!/usr/bin/env python
"""
Generate one of drcl2's generated LVIS v1 sets: the toy demo set (lvis_v1_toy_*) or the large GPU set
(lvis_v1_gen_large_*).

    python datasets/prepare_toy_lvis.py [--set toy|large] [--root DIR] [--workers N] [--seed N] ...

The set lands in DIR/<name>/ (DIR defaults to $DETECTRON2_DATASETS, else ./datasets; the name is
lvis_v1_toy or lvis_v1_gen_large). drcl2 generates a set by itself the first time it is used; this
command does it ahead of time, or with another seed or size (any ToyLVISSpec field, e.g.
--num-train-images) into another folder. An existing set is kept, never overwritten.
"""
import argparse
import dataclasses
import os
import time

from drcl2.data.generated.toy_lvis import GENERATED_SETS, SPLITS, ensure_toy_lvis, toy_lvis_categories, toy_lvis_paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(GENERATED_SETS), default="toy",
                        help="which set's spec to start from (default: toy)")
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="dataset root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: one per CPU core for sets of 5,000+ images, else 1); "
                             "the files do not depend on it")
    for field in dataclasses.fields(GENERATED_SETS["toy"]):
        defaults = ", ".join(f"{k}: {getattr(spec, field.name)}" for k, spec in GENERATED_SETS.items())
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"(default {defaults})")
    args = parser.parse_args()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(GENERATED_SETS["toy"])
                 if getattr(args, f.name) is not None}
    try:
        spec = dataclasses.replace(GENERATED_SETS[args.set], **overrides)
    except ValueError as e:
        parser.error(str(e))

    existed = all(os.path.isfile(p) for k, p in toy_lvis_paths(args.root, spec).items() if k.endswith("_json"))
    start = time.perf_counter()
    paths = ensure_toy_lvis(args.root, spec, num_workers=args.workers)
    seconds = time.perf_counter() - start
    groups = [c["frequency"] for c in toy_lvis_categories(spec)]
    images = sum(getattr(spec, f"num_{split}_images") for split in SPLITS)
    how = "already there" if existed else f"generated in {seconds:.1f} s, {images / seconds:.0f} images/s"
    print(
        f"{spec.name} ready in {paths['image_root']} ({how}): {spec.num_train_images} train / "
        f"{spec.num_val_images} val / {spec.num_test_images} test images, {len(groups)} classes "
        f"(rare {groups.count('r')}, common {groups.count('c')}, frequent {groups.count('f')})"
    )

if __name__ == "__main__":
    main()
