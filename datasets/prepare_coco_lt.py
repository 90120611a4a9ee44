#!/usr/bin/env python
"""
Write COCO-LT: the long-tailed subset of COCO train2017 that drcl2 registers as ``coco_lt_train``.

    python datasets/prepare_coco_lt.py                      # $DETECTRON2_DATASETS/coco (default ./datasets/coco)
    python datasets/prepare_coco_lt.py --coco-root /data/coco --seed 0

Reads  <coco-root>/annotations/instances_train2017.json
Writes <coco-root>/annotations/instances_train2017_lt.json
and prints the classes' targets, image and instance counts, and the size of the AP1-AP4 groups.
The rule (LVIS v1's long tail of training image counts, applied with a fixed seed) is documented in
datasets/README.md (section COCO-LT) and drcl2/data/coco_lt.py.
"""
import argparse
import json
import os
import sys
from collections import Counter

from drcl2.data.coco_lt import COCO_LT_DATASETS, coco_lt_group, make_coco_lt


def parse_args(argv=None):
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", default=os.path.join(root, "coco"), help="folder with annotations/")
    parser.add_argument("--input", default=None, help="COCO train json (default: <coco-root>/annotations/instances_train2017.json)")
    parser.add_argument("--output", default=None, help="COCO-LT json (default: <coco-root>/annotations/instances_train2017_lt.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies LVIS v1's image-count curve (default 1)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    input_json = args.input or os.path.join(args.coco_root, "annotations", "instances_train2017.json")
    output_json = args.output or os.path.join(
        args.coco_root, "annotations", os.path.basename(COCO_LT_DATASETS["coco_lt_train"][0])
    )
    if not os.path.isfile(input_json):
        sys.exit(
            f"error: {input_json} not found. Download COCO 2017 annotations "
            "(https://cocodataset.org/#download) into <coco-root>/annotations, or pass --input."
        )
    with open(input_json) as f:
        coco = json.load(f)
    subset, report = make_coco_lt(coco, seed=args.seed, scale=args.scale)
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    with open(output_json, "w") as f:
        json.dump(subset, f)

    names = {c["id"]: c["name"] for c in coco["categories"]}
    print(f"{'class':<16} {'target':>7} {'images':>7} {'instances':>9} group")
    for cat_id, r in sorted(report.items(), key=lambda kv: -kv[1]["instance_count"]):
        group = coco_lt_group(r["instance_count"])
        print(f"{names[cat_id]:<16} {r['target']:>7} {r['image_count']:>7} {r['instance_count']:>9} "
              f"{'AP%d' % group if group else '-'}")
    groups = Counter(coco_lt_group(r["instance_count"]) for r in report.values())
    print(
        f"wrote {output_json}: {len(subset['images'])} of {len(coco['images'])} images, "
        f"{len(subset['annotations'])} annotations (seed {args.seed}, scale {args.scale}); classes per group: "
        + ", ".join(f"AP{g}={groups.get(g, 0)}" for g in (1, 2, 3, 4))
    )
    return output_json


if __name__ == "__main__":
    main()
