"""
Any dataset in LVIS's JSON format, registered with metadata built from the JSON itself.

detectron2's :func:`~detectron2.data.datasets.register_lvis_instances` looks the class list up by
the dataset's *name* (LVIS v0.5 or v1) and assumes category ids 1..N. A user's own long-tailed
dataset has its own categories, so :func:`register_lvis_format` derives everything from the file:

* ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` (categories sorted by id);
* ``class_image_count`` (detectron2's format, as used by its federated loss:
  ``[{"id": dataset_id, "image_count": n}, ...]``) and ``class_frequency`` (``"r"``/``"c"``/``"f"``
  per contiguous id, by LVIS's rule on training image counts).

Counts and frequencies are taken from the categories' ``image_count`` / ``frequency`` fields where
the file has them (LVIS files carry the *training* counts in both train and val files); otherwise
they are counted from the file's own annotations, which is right for a training file.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "register_lvis_format",
    "load_lvis_format_json",
    "read_lvis_format_json",
    "lvis_format_metadata",
    "frequency_group",
    "lvis_v1_rank_image_counts",
    "validate_lvis_format",
]

# Where users are sent when their files are missing or malformed.
README_SECTION = "datasets/README.md, section 'Your own LVIS-format data'"

# LVIS's frequency groups, by the number of *training images* that contain the class.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


def frequency_group(image_count: int) -> str:
    """LVIS frequency group of a class seen in ``image_count`` training images: r (<= 10), c
    (11-100), f."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


def lvis_v1_rank_image_counts(num_classes: int) -> List[int]:
    """
    LVIS v1's long tail resampled to ``num_classes`` classes: the training image counts of the
    classes at ``num_classes`` evenly spaced ranks (rank ``round(i * 1202 / (num_classes - 1))``) of
    LVIS v1's 1,203 classes sorted by count, descending (1,977 down to 1; detectron2's copy of the
    counts). Being LVIS's absolute counts at evenly spaced ranks, they fall into LVIS's rare /
    common / frequent groups in LVIS's shares (337 / 461 / 405 of 1,203).
    """
    from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    curve = sorted((c["image_count"] for c in LVIS_CATEGORY_IMAGE_COUNT), reverse=True)
    if num_classes == 1:
        return [curve[0]]
    return [curve[round(i * (len(curve) - 1) / (num_classes - 1))] for i in range(num_classes)]


_REQUIRED_FIELDS = {
    "images": ("id", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def validate_lvis_format(lvis_dict: Dict[str, Any], json_file: str) -> None:
    """
    Check that ``lvis_dict`` (the parsed ``json_file``) has the fields drcl2 reads. Raises a
    ``ValueError`` naming the file, the entry and the missing field.
    """
    if not isinstance(lvis_dict, dict):
        raise ValueError(
            f"'{json_file}' is not in LVIS format: the top level must be a JSON object."
        )
    for section, fields in _REQUIRED_FIELDS.items():
        if section not in lvis_dict:
            raise ValueError(
                f"'{json_file}' is not in LVIS format: the top-level field '{section}' is missing "
                f"(see {README_SECTION})."
            )
        entries = lvis_dict[section]
        if not isinstance(entries, list):
            raise ValueError(f"'{json_file}' is not in LVIS format: '{section}' must be a list.")
        for i, entry in enumerate(entries):
            for field in fields:
                if field not in entry:
                    raise ValueError(
                        f"'{json_file}' is not in LVIS format: {section}[{i}] has no '{field}' "
                        f"field (see {README_SECTION})."
                    )
    for i, img in enumerate(lvis_dict["images"]):
        if "file_name" not in img and "coco_url" not in img:
            raise ValueError(
                f"'{json_file}' is not in LVIS format: images[{i}] has neither 'file_name' nor "
                f"'coco_url', so its image file cannot be found (see {README_SECTION})."
            )
    if not lvis_dict["categories"]:
        raise ValueError(f"'{json_file}' is not in LVIS format: 'categories' is empty.")
    cat_ids = {c["id"] for c in lvis_dict["categories"]}
    if len(cat_ids) != len(lvis_dict["categories"]):
        raise ValueError(f"'{json_file}': category ids are not unique.")
    img_ids = {img["id"] for img in lvis_dict["images"]}
    unknown = [
        i for i, ann in enumerate(lvis_dict["annotations"]) if ann["category_id"] not in cat_ids
    ]
    if unknown:
        anns = [lvis_dict["annotations"][i] for i in unknown]
        raise ValueError(
            f"'{json_file}': {len(unknown)} annotations in {len({a['image_id'] for a in anns})} "
            f"images have category ids {sorted({a['category_id'] for a in anns}, key=str)[:10]} "
            f"that are not in 'categories' (first: annotations[{unknown[0]}], id {anns[0]['id']}, "
            f"image_id {anns[0]['image_id']}). Add the categories, or remove the annotations (see "
            f"{README_SECTION})."
        )
    for i, ann in enumerate(lvis_dict["annotations"]):
        if ann["image_id"] not in img_ids:
            raise ValueError(
                f"'{json_file}': annotations[{i}] has image_id {ann['image_id']}, which is not in "
                "'images'."
            )


def lvis_format_metadata(lvis_dict: Dict[str, Any]) -> Dict[str, Any]:
    """
    Metadata of an LVIS-format dataset, from its parsed JSON (see the module docstring).

    Returns:
        dict with ``thing_classes`` (list[str]), ``thing_dataset_id_to_contiguous_id``
        (dict[int, int]), ``class_image_count`` (list[dict]) and ``class_frequency`` (list[str]).
    """
    categories = sorted(lvis_dict["categories"], key=lambda c: c["id"])
    have_counts = all("image_count" in c for c in categories)
    if not have_counts:
        images_per_class: Dict[int, set] = {c["id"]: set() for c in categories}
        for ann in lvis_dict["annotations"]:
            images_per_class[ann["category_id"]].add(ann["image_id"])
    image_counts = [
        int(c["image_count"]) if have_counts else len(images_per_class[c["id"]]) for c in categories
    ]
    return {
        "thing_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
        "class_image_count": [
            {"id": c["id"], "image_count": n} for c, n in zip(categories, image_counts)
        ],
        "class_frequency": [
            c.get("frequency", frequency_group(n)) for c, n in zip(categories, image_counts)
        ],
    }


def read_lvis_format_json(json_file: str) -> Dict[str, Any]:
    """
    The parsed ``json_file``, checked by :func:`validate_lvis_format`.

    Raises:
        FileNotFoundError: the file does not exist (the message says where to look).
        ValueError: not JSON, or not in LVIS format (the message names the entry and field).
    """
    if not PathManager.exists(json_file):
        raise FileNotFoundError(
            f"LVIS-format annotation file '{json_file}' does not exist. Put the file there, or set "
            f"$DETECTRON2_DATASETS to the folder that holds your datasets (see {README_SECTION})."
        )
    with PathManager.open(json_file) as f:
        try:
            lvis_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{json_file}' is not valid JSON: {e}") from e
    validate_lvis_format(lvis_dict, json_file)
    return lvis_dict


def _image_file(image_root: str, img: Dict[str, Any]) -> str:
    if "file_name" in img:
        return os.path.join(image_root, img["file_name"])
    # LVIS v1 gives no file name, only the COCO url, e.g.
    # 'http://images.cocodataset.org/train2017/000000155379.jpg' ->
    # image_root/train2017/000000155379.jpg
    split_folder, file_name = img["coco_url"].split("/")[-2:]
    return os.path.join(image_root, split_folder, file_name)


def load_lvis_format_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    lvis_dict: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """
    Load an LVIS-format JSON into detectron2's dataset dicts (``file_name``, ``height``, ``width``,
    ``image_id``, ``neg_category_ids``, ``not_exhaustive_category_ids``, ``annotations`` with
    ``id`` (the json's), ``bbox`` (XYWH_ABS), ``category_id`` (contiguous) and ``segmentation``
    (polygons) if present).

    Args:
        json_file: the annotation file.
        image_root: folder that image ``file_name`` (or the COCO url's split folder) is relative to.
        dataset_name: if given, its registered ``thing_dataset_id_to_contiguous_id`` maps category
        ids;
            otherwise the mapping is built from the file's categories (sorted by id).
        lvis_dict: the already parsed ``json_file``, to avoid reading it twice.
    """
    if lvis_dict is None:
        lvis_dict = read_lvis_format_json(json_file)
    if dataset_name is not None and MetadataCatalog.get(dataset_name).get(
        "thing_dataset_id_to_contiguous_id"
    ):
        id_map = MetadataCatalog.get(dataset_name).thing_dataset_id_to_contiguous_id
    else:
        id_map = lvis_format_metadata(lvis_dict)["thing_dataset_id_to_contiguous_id"]

    anns_per_image: Dict[int, List[Dict[str, Any]]] = {}
    for ann in lvis_dict["annotations"]:
        anns_per_image.setdefault(ann["image_id"], []).append(ann)

    dataset_dicts = []
    # sorted by image id, like detectron2's loader, for reproducible order
    for img in sorted(lvis_dict["images"], key=lambda x: x["id"]):
        record = {
            "file_name": _image_file(image_root, img),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            "neg_category_ids": img.get("neg_category_ids", []),
            "not_exhaustive_category_ids": img.get("not_exhaustive_category_ids", []),
        }
        objs = []
        for ann in sorted(anns_per_image.get(img["id"], []), key=lambda a: a["id"]):
            obj = {
                "id": ann["id"],  # names the annotation in drcl2.data.dataset_check's reports
                "bbox": ann["bbox"],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": id_map[ann["category_id"]],
            }
            if "segmentation" in ann:
                polygons = [p for p in ann["segmentation"] if len(p) % 2 == 0 and len(p) >= 6]
                if len(polygons) != len(ann["segmentation"]) or not polygons:
                    raise ValueError(
                        f"'{json_file}': annotation {ann['id']} has a polygon with fewer than 3 "
                        "points (or none); LVIS segmentations are lists of [x1, y1, x2, y2, ...]."
                    )
                obj["segmentation"] = polygons
            objs.append(obj)
        record["annotations"] = objs
        dataset_dicts.append(record)
    logger.info(f"Loaded {len(dataset_dicts)} images in LVIS format from {json_file}")
    return dataset_dicts


def register_lvis_format(name: str, json_file: str, image_root: str) -> None:
    """
    Register an LVIS-format dataset under ``name``: its dicts in :class:`DatasetCatalog` (loaded
    lazily) and its metadata, built from the JSON now, in :class:`MetadataCatalog`
    (``evaluator_type="lvis"``, so drcl2's Trainer evaluates it with APr / APc / APf).

    Raises:
        FileNotFoundError: ``json_file`` does not exist (the message says where to look).
        ValueError: the file is not in LVIS format (the message names the missing field).
    """
    if not PathManager.isdir(image_root):
        raise FileNotFoundError(
            f"Image folder '{image_root}' of dataset '{name}' does not exist. Put the images "
            "there, or set $DETECTRON2_DATASETS to the folder that holds your datasets (see "
            f"{README_SECTION})."
        )
    metadata = lvis_format_metadata(read_lvis_format_json(json_file))
    DatasetCatalog.register(name, lambda: load_lvis_format_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **metadata
    )
