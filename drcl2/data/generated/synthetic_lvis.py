"""
Generated LVIS-style data for tests and benchmarks: ground truth and detections for the evaluators
(:func:`synthetic_lvis_gt`, :func:`synthetic_lvis_detections`), and JPEGs with their dataset dicts
for the data pipeline (:func:`synthetic_lvis_jpegs`).

The ground truth is a federated LVIS v1 json (``images`` with ``neg_category_ids`` and
``not_exhaustive_category_ids``, polygon ``segmentation``, ``area`` = mask area, categories with
``frequency``); the detections are what detectron2's ``instances_to_coco_json`` produces (XYWH
boxes, RLE masks with ``str`` counts, dataset category ids). Nothing here is a model: detections are
jittered copies of ground-truth boxes plus confusions and background boxes, with scores rounded to
two decimals so that ties (and therefore the evaluators' tie-breaking) are exercised.
"""

import math
import os

import numpy as np
import pycocotools.mask as mask_util

from ...checkpoint import atomic_write

__all__ = [
    "lvis_v1_categories",
    "synthetic_lvis_gt",
    "synthetic_lvis_detections",
    "synthetic_lvis_jpegs",
    "synthetic_model_outputs",
]


def lvis_v1_categories():
    """
    The 1,203 LVIS v1 categories (id, name, frequency, image_count), from detectron2's copies of the
    LVIS v1 category list and training image counts.

    Returns:
        list[dict]: sorted by id; ``image_count`` is the LVIS v1 *train* image count.
    """
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    from detectron2.data.datasets.lvis_v1_category_image_count import (
        LVIS_CATEGORY_IMAGE_COUNT,
    )

    counts = {c["id"]: c["image_count"] for c in LVIS_CATEGORY_IMAGE_COUNT}
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": c["synonyms"],
            "frequency": c["frequency"],
            "image_count": counts[c["id"]],
        }
        for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    ]


def _polygon_in_box(rng, x, y, w, h, num_vertices=10):
    """A star-ish convex-or-not polygon inscribed in box XYWH, as COCO's flat [x0, y0, x1, ...]."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, num_vertices))
    radii = rng.uniform(0.6, 1.0, num_vertices)
    cx, cy = x + w / 2, y + h / 2
    xs = cx + radii * np.cos(angles) * w / 2
    ys = cy + radii * np.sin(angles) * h / 2
    return np.stack([xs, ys], axis=1).reshape(-1).round(2).tolist()


def _random_box(rng, width, height, min_size=4.0):
    """A random XYWH box inside a ``width`` x ``height`` image, with log-uniform size."""
    w = float(np.exp(rng.uniform(math.log(min_size), math.log(width * 0.9))))
    h = float(np.clip(w * np.exp(rng.uniform(-0.7, 0.7)), min_size, height * 0.95))
    x = float(rng.uniform(0, width - w))
    y = float(rng.uniform(0, height - h))
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def synthetic_lvis_gt(
    num_images,
    categories,
    *,
    seed=0,
    image_size=(96, 160),
    max_categories_per_image=6,
    max_instances_per_category=3,
    num_negative_categories=4,
    not_exhaustive_prob=0.2,
    empty_image_prob=0.05,
):
    """
    Args:
        num_images (int): number of images.
        categories (list[dict]): LVIS categories with ``id``, ``name`` and ``frequency``; an
            ``image_count`` (if present) weights how often a category is annotated.
        seed (int): seed of the generator; the output is a pure function of the arguments.
        image_size (tuple[int, int]): images get width and height uniform in this range.
        max_categories_per_image, max_instances_per_category (int): size of the positive set.
        num_negative_categories (int): up to this many ``neg_category_ids`` per image.
        not_exhaustive_prob (float): probability that a positive category of an image is listed in
            its ``not_exhaustive_category_ids``.
        empty_image_prob (float): probability that an image has no positive category at all.

    Returns:
        dict: an LVIS v1 json (``images``, ``annotations``, ``categories``), annotation ids from 1.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.array([c["id"] for c in categories])
    weights = np.array([float(c.get("image_count", 1)) + 1.0 for c in categories])
    weights = weights / weights.sum()
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
        num_pos = (
            0
            if rng.random() < empty_image_prob
            else int(rng.integers(1, max_categories_per_image + 1))
        )
        num_pos = min(num_pos, len(cat_ids))
        pos = rng.choice(cat_ids, size=num_pos, replace=False, p=weights) if num_pos else []
        remaining = np.setdiff1d(cat_ids, pos)
        num_neg = min(int(rng.integers(0, num_negative_categories + 1)), len(remaining))
        neg = rng.choice(remaining, size=num_neg, replace=False) if num_neg else []
        not_exhaustive = [int(c) for c in pos if rng.random() < not_exhaustive_prob]
        for cat_id in pos:
            for _ in range(int(rng.integers(1, max_instances_per_category + 1))):
                box = _random_box(rng, width, height)
                polygon = _polygon_in_box(rng, *box)
                rle = mask_util.frPyObjects([polygon], height, width)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(cat_id),
                        "bbox": box,
                        "area": float(mask_util.area(mask_util.merge(rle))),
                        "segmentation": [polygon],
                    }
                )
        images.append(
            {
                "id": image_id,
                "width": width,
                "height": height,
                "file_name": f"{image_id:012d}.jpg",
                "neg_category_ids": sorted(int(c) for c in neg),
                "not_exhaustive_category_ids": sorted(not_exhaustive),
            }
        )
    cats = [
        {k: c[k] for k in ("id", "name", "frequency", "image_count", "synonyms") if k in c}
        for c in categories
    ]
    return {"images": images, "annotations": annotations, "categories": cats}


def synthetic_lvis_detections(
    gt,
    *,
    dets_per_image=50,
    seed=0,
    with_masks=True,
    empty_image_prob=0.05,
    score_decimals=2,
):
    """
    Detections for the images of ``gt``, in detectron2's ``instances_to_coco_json`` format (with
    dataset category ids, as :class:`LVISEvaluator` hands them to the LVIS API).

    Per image: a slightly shifted and scaled copy (box and polygon mask) of each ground-truth
    instance, 15% of them with a confused category; detections of the image's negative categories;
    and background boxes of random categories (mostly dropped by federated evaluation), truncated
    to ``dets_per_image`` (instances beyond that number are missed). A fraction ``empty_image_prob``
    of images gets no detection. Scores are rounded to ``score_decimals``, so ties are common.

    Returns:
        list[dict]: keys image_id, category_id, bbox (XYWH), score, and segmentation (RLE with str
        counts) when ``with_masks``.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.array([c["id"] for c in gt["categories"]])
    anns_by_image = {}
    for ann in gt["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    results = []
    for img in gt["images"]:
        if rng.random() < empty_image_prob:
            continue
        width, height = img["width"], img["height"]
        boxes, classes, polygons, scores = [], [], [], []
        for ann in anns_by_image.get(img["id"], []):
            # A localisation error of a few percent of the object size, shared by box and mask.
            x, y, w, h = ann["bbox"]
            dx, dy = rng.normal(0, 0.08, 2) * [w, h]
            scale = float(np.exp(rng.normal(0, 0.08)))
            nw, nh = w * scale, h * scale
            nx = float(np.clip(x + dx + (w - nw) / 2, 0, width - 1))
            ny = float(np.clip(y + dy + (h - nh) / 2, 0, height - 1))
            boxes.append([nx, ny, float(min(nw, width - nx)), float(min(nh, height - ny))])
            poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            center = np.array([x + w / 2, y + h / 2])
            poly = (poly - center) * scale + center + [dx, dy]
            polygons.append(poly.reshape(-1).tolist())
            confused = rng.random() < 0.15
            classes.append(int(rng.choice(cat_ids)) if confused else ann["category_id"])
            scores.append(rng.uniform(0.3, 1.0))
        for cat_id in img["neg_category_ids"]:
            for _ in range(int(rng.integers(0, 3))):
                boxes.append(_random_box(rng, width, height))
                polygons.append(_polygon_in_box(rng, *boxes[-1]))
                classes.append(int(cat_id))
                scores.append(rng.uniform(0.05, 0.8))
        while len(boxes) < dets_per_image:
            boxes.append(_random_box(rng, width, height))
            polygons.append(_polygon_in_box(rng, *boxes[-1]))
            classes.append(int(rng.choice(cat_ids)))
            scores.append(rng.uniform(0.05, 0.8))
        boxes, classes = boxes[:dets_per_image], classes[:dets_per_image]
        scores = np.round(scores[:dets_per_image], score_decimals)
        if with_masks:
            rles = mask_util.frPyObjects(polygons[:dets_per_image], height, width)
        for k, (box, cat_id) in enumerate(zip(boxes, classes)):
            result = {
                "image_id": img["id"],
                "category_id": cat_id,
                "bbox": [float(v) for v in box],
                "score": float(scores[k]),
            }
            if with_masks:
                rle = rles[k]
                result["segmentation"] = {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("utf-8"),
                }
            results.append(result)
    return results


def synthetic_lvis_jpegs(
    folder, num_images, width, height, *, instances=12, num_classes=1203, seed=0
):
    """
    Write ``num_images`` LVIS-like JPEGs of ``width`` x ``height`` into ``folder`` and return their
    detectron2 dataset dicts (``annotations``: ``instances`` polygons of 12-24 vertices with their
    boxes, ``category_id`` in [0, num_classes)). Deterministic in ``seed``.
    """
    import cv2
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_images):
        field = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 12, image.shape)
        image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)
        annotations = []
        for _ in range(instances):
            cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
            rx, ry = rng.uniform(0.02, 0.25) * width, rng.uniform(0.02, 0.25) * height
            n = int(rng.integers(12, 25))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(0.7, 1.0, n)
            poly = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1)
            poly = poly.clip(0, [width - 1, height - 1])
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.fillPoly(image, [poly.round().astype(np.int32)], colour)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append(
                {
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": int(rng.integers(0, num_classes)),
                    "iscrowd": 0,
                    "segmentation": [poly.ravel().tolist()],
                }
            )
        path = os.path.join(folder, f"{width}x{height}_{i:04d}.jpg")
        # atomic: processes generating the same set at once never see half a file
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        atomic_write(path, lambda f: f.write(jpeg.tobytes()))
        records.append(
            {
                "file_name": path,
                "image_id": len(records) + 1,
                "height": height,
                "width": width,
                "annotations": annotations,
            }
        )
    return records


def synthetic_model_outputs(gt, dets, with_masks: bool):
    """
    Yield ``(inputs, outputs)`` per image of ``gt``: a detectron2 detector's outputs rebuilt from
    the LVIS-format detections ``dets`` (``Instances`` with ``pred_boxes``, ``scores``,
    ``pred_classes`` and, ``with_masks``, ``pred_masks`` of the image's size, empty for an image
    without detections, as detectron2 gives them), for the evaluators' tests and benchmarks.
    """
    import torch
    from detectron2.structures import Boxes, Instances

    by_image = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        ds = by_image.get(img["id"], [])
        inst = Instances((h, w))
        xywh = torch.tensor([d["bbox"] for d in ds], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.tensor([d["score"] for d in ds], dtype=torch.float32)
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in ds], dtype=torch.int64)
        if with_masks:
            if ds:
                rles = [
                    {
                        "size": d["segmentation"]["size"],
                        "counts": d["segmentation"]["counts"].encode(),
                    }
                    for d in ds
                ]
                m = mask_util.decode(rles)  # H, W, N (Fortran order)
                masks = torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1))).bool()
                inst.pred_masks = masks
            else:
                inst.pred_masks = torch.zeros((0, h, w), dtype=torch.bool)
        yield [{"image_id": img["id"], "height": h, "width": w}], [{"instances": inst}]
