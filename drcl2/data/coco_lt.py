"""
COCO-LT: a long-tailed subset of COCO train2017, and its registration (``coco_lt_train``, evaluated
on COCO val2017 as ``coco_lt_val``).

The split rule (:func:`make_coco_lt`, written to disk by ``datasets/prepare_coco_lt.py``; see
datasets/README.md) gives the 80 COCO classes LVIS v1's long tail of *training image counts*:

1. Rank the classes by their number of train2017 images, descending (ties: smaller category id
   first). Class of rank ``i`` (of K) gets the target image count
   ``t_i = min(n_i, max(1, round(scale * L[round(i * (1202) / (K - 1))])))`` where ``L`` are the
   1,203 LVIS v1 training image counts sorted in descending order (from detectron2's copy) and
   ``n_i`` the class's available images: the classes sit at evenly spaced ranks of LVIS's curve.
2. Visit the images once, in one seeded random order (``numpy.random.default_rng(seed)
   .permutation`` of the sorted image ids), class by class from the smallest target to the largest
   (ties: rarer rank first). An image of the current class is taken when every class it contains is
   still below its target. Taken images keep *all* their annotations (no missing labels), and no
   class ever exceeds its target; a class that runs out of admissible images stays below it.

Evaluation groups classes by their number of training *instances* in the resulting set:
AP1 [1, 20), AP2 [20, 400), AP3 [400, 8000), AP4 [8000, inf) (:func:`coco_lt_group`).
"""

import logging
import os
from collections import defaultdict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from .lvis_format import lvis_v1_rank_image_counts

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_LT_GROUP_BOUNDS",
    "COCO_LT_DATASETS",
    "class_counts",
    "coco_lt_group",
    "coco_lt_targets",
    "make_coco_lt",
    "register_coco_lt",
]

# Lower bounds of the AP1..AP4 groups, in training instances per class.
COCO_LT_GROUP_BOUNDS = (1, 20, 400, 8000)

# name -> (json file, image folder), relative to the datasets root.
COCO_LT_DATASETS = {
    "coco_lt_train": ("coco/annotations/instances_train2017_lt.json", "coco/train2017"),
    "coco_lt_val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
}


def coco_lt_group(instance_count):
    """1..4 for the AP1..AP4 group of a class with ``instance_count`` training instances; 0 if
    none."""
    return int(np.searchsorted(COCO_LT_GROUP_BOUNDS, instance_count, side="right"))


def class_counts(coco_dict):
    """
    Args:
        coco_dict (dict): a COCO-format json.

    Returns:
        dict[int, dict]: category id -> {"image_count", "instance_count"} (non-crowd instances),
        for every category of ``coco_dict["categories"]``.
    """
    images = defaultdict(set)
    instances = defaultdict(int)
    for ann in coco_dict["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    return {
        c["id"]: {"image_count": len(images[c["id"]]), "instance_count": instances[c["id"]]}
        for c in coco_dict["categories"]
    }


def coco_lt_targets(available, scale=1.0):
    """
    Target image counts (step 1 of the module docstring).

    Args:
        available (dict[int, int]): category id -> number of images containing it.
        scale (float): multiplies LVIS's curve (1.0: LVIS v1's absolute counts, 1,977 down to 1).

    Returns:
        dict[int, int]: category id -> target image count (0 for a class with no image).
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    ranked = sorted(available, key=lambda c: (-available[c], c))
    curve = lvis_v1_rank_image_counts(len(ranked)) if ranked else []
    return {
        cat_id: min(available[cat_id], max(1, round(scale * float(count))))
        for cat_id, count in zip(ranked, curve)
    }


def make_coco_lt(coco_dict, *, seed=0, scale=1.0):
    """
    The COCO-LT subset of a COCO-format training json (rule in the module docstring).

    Args:
        coco_dict (dict): e.g. instances_train2017.json, loaded; not modified.
        seed (int): seed of the image order.
        scale (float): see :func:`coco_lt_targets`.

    Returns:
        tuple[dict, dict]: the subset json (same ``categories``, kept ``images`` and all their
        ``annotations``, ``info`` recording the rule, seed and scale), and
        {category id: {"target", "image_count", "instance_count"}} of the subset.
    """
    for key in ("images", "annotations", "categories"):
        if key not in coco_dict:
            raise ValueError(f"Not a COCO-format json: the top-level field '{key}' is missing.")
    cats_of_image = defaultdict(set)
    images_of_cat = defaultdict(set)
    for ann in coco_dict["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        cats_of_image[ann["image_id"]].add(ann["category_id"])
        images_of_cat[ann["category_id"]].add(ann["image_id"])
    available = {c["id"]: len(images_of_cat[c["id"]]) for c in coco_dict["categories"]}
    targets = coco_lt_targets(available, scale)
    rank = {c: i for i, c in enumerate(sorted(available, key=lambda c: (-available[c], c)))}

    image_ids = sorted(img["id"] for img in coco_dict["images"])
    order = np.random.default_rng(seed).permutation(len(image_ids))
    position = {image_ids[j]: p for p, j in enumerate(order)}
    taken, have = set(), defaultdict(int)
    for cat_id in sorted(targets, key=lambda c: (targets[c], -rank[c])):
        for image_id in sorted(images_of_cat[cat_id], key=position.__getitem__):
            if have[cat_id] >= targets[cat_id]:
                break
            if image_id in taken or any(have[c] >= targets[c] for c in cats_of_image[image_id]):
                continue
            taken.add(image_id)
            for c in cats_of_image[image_id]:
                have[c] += 1

    subset = {
        "info": {
            **coco_dict.get("info", {}),
            "description": (
                "COCO-LT: long-tailed subset of COCO train2017 (drcl2.data.coco_lt.make_coco_lt)"
            ),
            "coco_lt_rule": "LVIS v1 train image-count curve at evenly spaced ranks; images taken "
            "rare-first while every class they contain is below its target",
            "coco_lt_seed": seed,
            "coco_lt_scale": scale,
        },
        "licenses": coco_dict.get("licenses", []),
        "categories": coco_dict["categories"],
        "images": [img for img in coco_dict["images"] if img["id"] in taken],
        "annotations": [ann for ann in coco_dict["annotations"] if ann["image_id"] in taken],
    }
    counts = class_counts(subset)
    report = {c: {"target": targets[c], **counts[c]} for c in targets}
    return subset, report


def register_coco_lt(root):
    """
    Register ``coco_lt_train`` (the COCO-LT json written by ``datasets/prepare_coco_lt.py``, images
    of train2017) and ``coco_lt_val`` (COCO val2017, i.e. the files of detectron2's
    ``coco_2017_val``) under ``root``, like detectron2's ``register_coco_instances`` but with
    ``evaluator_type="coco_lt"`` (drcl2's Trainer then evaluates with COCOLTEvaluator: COCO metrics
    plus AP1-AP4 from ``coco_lt_train``'s instance counts, named by ``train_dataset_name``). Nothing
    is read now.
    """
    meta = _get_builtin_metadata("coco")
    for name, (json_file, image_root) in COCO_LT_DATASETS.items():
        json_file, image_root = os.path.join(root, json_file), os.path.join(root, image_root)
        DatasetCatalog.register(
            name, lambda j=json_file, i=image_root, n=name: load_coco_json(j, i, n)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco_lt",
            train_dataset_name="coco_lt_train",
            **meta,
        )


# Like detectron2's builtin datasets: under $DETECTRON2_DATASETS, default ./datasets
if "coco_lt_train" not in DatasetCatalog.list():
    register_coco_lt(os.getenv("DETECTRON2_DATASETS", "datasets"))
