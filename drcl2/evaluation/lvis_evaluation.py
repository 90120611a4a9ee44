"""
LVIS evaluation on faster-coco-eval's C++ core, with the reference ``lvis`` API as an alternative.

:class:`LVISEvaluator` is a drop-in replacement of detectron2's: same constructor arguments, same
``bbox`` / ``segm`` result dicts (AP, AP50, AP75, APs, APm, APl, APr, APc, APf, in percent), plus a
``backend`` argument (config key ``TEST.DRCL2.LVIS_BACKEND``) and a per-class report
(``per_class_ap.csv`` and ``per_class_ap.png`` in ``output_dir``).

The "faster" backend gives the lvis API's numbers (to 1e-4 or better, tested) because it feeds
``COCOeval_faster(..., lvis_style=True)`` exactly what ``lvis.LVISResults`` / ``lvis.LVISEval`` see:

* **max detections**: LVIS keeps the top ``max_dets_per_image`` detections of each *image*, over
  all categories, before federated filtering (``LVISResults.limit_dets_per_image``, a stable sort by
  score); COCOeval limits per (image, category). We apply LVIS's per-image limit ourselves, with the
  same stable sort, and give COCOeval ``maxDets = [max_dets_per_image]``, which can then never cut.
* **detection area and box**: as ``LVISResults``: box area ``w * h`` for "bbox", mask area and
  ``toBbox(mask)`` for "segm" (detectron2 removes the predicted box before mask evaluation).
* **crowd / ignore**: the lvis API computes IoU with ``iscrowd = 0`` for every ground truth, so we
  pass ground truth with ``iscrowd = 0``. It honours a per-annotation ``ignore`` flag, which
  COCOeval cannot express without crowd IoU: such annotations are rejected with an error (LVIS has
  none).
* **federated rules**: detections of categories neither annotated in an image nor listed in its
  ``neg_category_ids`` are dropped (by us, after the per-image limit, as LVIS does); unmatched
  detections of ``not_exhaustive_category_ids`` are ignored; area ranges (all, small < 32², medium <
  96², large) are the same in both.
* **order and ties**: detections keep their input order within an image, and both implementations
  sort by score with stable sorts, per (image, category) and per category over images in id order.
* **summary**: AP, AP50, AP75, APs/m/l and APr/c/f are means of the precision array over the entries
  > -1 with the categories' ``frequency`` field as groups, exactly as ``LVISEval._summarize``; an
  empty group gives -1 (so -100 in percent, as detectron2 reports it).

The only numeric difference left is the C++ precision ``tp / (tp + fp)`` against Python's
``tp / (tp + fp + eps)`` (eps = 2.2e-16), far below 1e-4.
"""

import contextlib
import copy
import gc
import itertools
import logging
import os
from collections import OrderedDict, defaultdict

import numpy as np
from detectron2.evaluation import LVISEvaluator as _D2LVISEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..data.lvis_format import frequency_group
from .lvis_compat import patch_lvis_numpy
from .per_class import lvis_per_class_rows, write_per_class_report
from .predictions import (
    columns_from_coco_json,
    columns_to_coco_json,
    dump_json,
    instances_to_columns,
    load_predictions,
    save_predictions,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LVISEvaluator",
    "LVIS_METRICS",
    "LVIS_BACKENDS",
    "evaluate_lvis",
    "complete_lvis_ground_truth",
    "training_image_counts",
    "faster_lvis_ground_truth",
    "federated_filter",
    "limit_dets_per_image",
    "summarize_lvis_precision",
]

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
LVIS_BACKENDS = ("faster", "lvis")
_FREQUENCY_GROUPS = ("r", "c", "f")
_AREA_LABELS = ("all", "small", "medium", "large")


def limit_dets_per_image(results, max_dets):
    """
    Keep the ``max_dets`` highest-scoring detections of each image, exactly as
    ``lvis.LVISResults.limit_dets_per_image`` does (same grouping, same stable sort, same order).

    Args:
        results (list[dict]): detections with "image_id" and "score".
        max_dets (int): per-image limit; negative means no limit.

    Returns:
        list[dict]: the kept detections, grouped by image in order of first appearance.
    """
    if max_dets < 0:
        return list(results)
    by_image = defaultdict(list)
    for ann in results:
        by_image[ann["image_id"]].append(ann)
    for image_id, anns in by_image.items():
        if len(anns) > max_dets:
            by_image[image_id] = sorted(anns, key=lambda ann: ann["score"], reverse=True)[:max_dets]
    return [ann for anns in by_image.values() for ann in anns]


def training_image_counts(train_dataset_names):
    """
    The training image count of each category, summed over the registered training datasets.

    Args:
        train_dataset_names (list[str]): registered datasets whose metadata ``class_image_count``
            (``[{"id": dataset category id, "image_count": n}, ...]``, as set by
            :func:`~drcl2.data.register_lvis_format` and by detectron2 for LVIS) holds their counts.

    Returns:
        dict[int, int] or None: {dataset category id: images}; None when ``train_dataset_names`` is
        empty or one of them has no ``class_image_count``.
    """
    from detectron2.data import MetadataCatalog

    if not train_dataset_names:
        return None
    counts = defaultdict(int)
    for name in train_dataset_names:
        class_image_count = MetadataCatalog.get(name).get("class_image_count", None)
        if not class_image_count:
            return None
        for c in class_image_count:
            counts[c["id"]] += int(c["image_count"])
    return dict(counts)


def _annotation_area(ann, height, width):
    """An LVIS annotation's area as LVIS files hold it: its polygons' area, else its box's."""
    if ann.get("segmentation"):
        import pycocotools.mask as mask_util

        rles = mask_util.frPyObjects(ann["segmentation"], height, width)
        return float(mask_util.area(mask_util.merge(rles)))
    return float(ann["bbox"][2] * ann["bbox"][3])


def complete_lvis_ground_truth(
    lvis_dataset, train_image_counts=None, train_source=None, source="the LVIS json"
):
    """
    Fill in, in place, the LVIS fields that a custom LVIS-format json may leave out and that both
    backends read: each category's ``frequency``, each annotation's ``area`` (its polygons' area, as
    in LVIS files, or its box's without a segmentation) and each image's ``neg_category_ids`` /
    ``not_exhaustive_category_ids`` (missing ones become empty lists: the image's unannotated
    categories are then not judged, the federated rule's reading of "nothing known"). Fields the
    json has are never changed.

    A missing ``frequency`` is LVIS's rule (:func:`~drcl2.data.lvis_format.frequency_group`: r 1-10
    training images, c 11-100, f > 100) on the category's training image count: from
    ``train_image_counts`` when given (a category absent from it has 0, hence "r"), otherwise, with
    a warning, from the json's own annotations (what an evaluated set's counts are not meant to be).
    The category also gets ``image_count`` (the training count) when it comes from
    ``train_image_counts`` and the json has none. Each derivation is logged.

    Args:
        lvis_dataset (dict): the loaded LVIS json (``images``, ``annotations``, ``categories``);
            modified in place, so an ``lvis.LVIS`` index built on it sees the new fields.
        train_image_counts (dict[int, int] or None): {dataset category id: training images}, e.g.
            :func:`training_image_counts`.
        train_source (str or list[str] or None): where ``train_image_counts`` come from (e.g. the
            training dataset names), for the log.
        source (str): where the json came from, for the log.
    """
    images = lvis_dataset["images"]
    no_area = [ann for ann in lvis_dataset["annotations"] if "area" not in ann]
    if no_area:
        sizes = {img["id"]: (img["height"], img["width"]) for img in images}
        for ann in no_area:
            ann["area"] = _annotation_area(ann, *sizes[ann["image_id"]])
        logger.info(
            f"{source}: {len(no_area)} of {len(lvis_dataset['annotations'])} annotations have no "
            "'area'; using their polygons' area (their box's without a segmentation)."
        )
    for field in ("neg_category_ids", "not_exhaustive_category_ids"):
        missing = [img for img in images if field not in img]
        for img in missing:
            img[field] = []
        if missing:
            logger.info(
                f"{source}: {len(missing)} of {len(images)} images have no '{field}'; using [] for "
                "them."
            )

    no_frequency = [
        c for c in lvis_dataset["categories"] if c.get("frequency") not in _FREQUENCY_GROUPS
    ]
    if not no_frequency:
        return
    if train_image_counts is not None:
        counts = train_image_counts
        origin = f"the training image counts of {train_source or 'the training set'}"
        for c in no_frequency:
            c.setdefault("image_count", int(counts.get(c["id"], 0)))
        log = logger.info
    else:
        images_per_category = defaultdict(set)
        for ann in lvis_dataset["annotations"]:
            images_per_category[ann["category_id"]].add(ann["image_id"])
        counts = {cat_id: len(ids) for cat_id, ids in images_per_category.items()}
        origin = (
            f"the image counts of {source} itself, as no training counts are known (the groups "
            "should come from the training set: pass train_dataset_names to LVISEvaluator, as "
            "drcl2's Trainer does with DATASETS.TRAIN)"
        )
        log = logger.warning
    for c in no_frequency:
        c["frequency"] = frequency_group(int(counts.get(c["id"], 0)))
    groups = {g: sum(c["frequency"] == g for c in no_frequency) for g in _FREQUENCY_GROUPS}
    log(
        f"{source}: {len(no_frequency)} of {len(lvis_dataset['categories'])} categories have no "
        "'frequency'; derived their r/c/f groups with LVIS's rule (r <= 10 < c <= 100 < f images) "
        f"from {origin}: {groups['r']} r, {groups['c']} c, {groups['f']} f."
    )


def faster_lvis_ground_truth(lvis_dataset, source="the LVIS json"):
    """
    A faster-coco-eval ``COCO`` index of an LVIS json, set up as the lvis API evaluates it.

    Args:
        lvis_dataset (dict): the loaded LVIS json (``images``, ``annotations``, ``categories``); it
        is
            not modified (annotations are shallow-copied with ``iscrowd = 0``).
        source (str): where the json came from, for error messages.

    Returns:
        faster_coco_eval.COCO
    """
    from faster_coco_eval import COCO

    no_frequency = [
        c["id"] for c in lvis_dataset["categories"] if c.get("frequency") not in _FREQUENCY_GROUPS
    ]
    if no_frequency:
        raise ValueError(
            f"{source}: categories {no_frequency[:10]} have no 'frequency' in {_FREQUENCY_GROUPS}; "
            "LVIS evaluation groups APr/APc/APf by it. Add it to the json's categories, or derive "
            "it from training image counts with complete_lvis_ground_truth (LVISEvaluator does)."
        )
    annotations = []
    for ann in lvis_dataset["annotations"]:
        if ann.get("ignore", 0):
            raise ValueError(
                f"{source}: annotation {ann['id']} has 'ignore' set. The lvis API ignores such "
                "ground truth in a way COCOeval cannot reproduce; evaluate with "
                "TEST.DRCL2.LVIS_BACKEND 'lvis' (or remove the flag)."
            )
        ann = dict(ann)
        ann["iscrowd"] = 0  # LVISEval computes every IoU as non-crowd
        annotations.append(ann)
    dataset = {
        "images": lvis_dataset["images"],
        "categories": lvis_dataset["categories"],
        "annotations": annotations,
    }
    return COCO(dataset)


def federated_filter(gt, results):
    """
    Drop the detections that LVIS does not judge: those of a category neither annotated in their
    image nor listed in its ``neg_category_ids`` (``LVISEval._prepare``).

    Args:
        gt (faster_coco_eval.COCO): the ground truth.
        results (list[dict]): detections; must already be limited per image (LVIS limits first).

    Returns:
        list[dict]: the judged detections, in input order.
    """
    judged = defaultdict(set)
    for image_id, img in gt.imgs.items():
        judged[image_id].update(img.get("neg_category_ids", []))
    for ann in gt.dataset["annotations"]:
        judged[ann["image_id"]].add(ann["category_id"])
    return [r for r in results if r["category_id"] in judged[r["image_id"]]]


def _faster_results(gt, results, iou_type):
    """The detections as a faster-coco-eval ``COCO``, with LVISResults' areas, boxes and ids."""
    import faster_coco_eval.core.mask as mask_util
    from faster_coco_eval import COCO

    anns = results  # already copies (evaluate_lvis)
    if iou_type == "bbox":
        for ann in anns:
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    else:
        rles = [ann["segmentation"] for ann in anns]
        areas = mask_util.area(rles)
        boxes = mask_util.toBbox(rles)
        for ann, area, box in zip(anns, areas, boxes):
            ann["area"] = float(area)
            ann["bbox"] = box.tolist()
    for i, ann in enumerate(anns):
        ann["id"] = i + 1
        ann["iscrowd"] = 0
    dt = COCO()
    dt.dataset = {
        "images": gt.dataset["images"],
        "categories": gt.dataset["categories"],
        "annotations": anns,
    }
    dt.createIndex()
    return dt


def summarize_lvis_precision(precision, iou_thrs, category_frequencies):
    """
    LVIS summary metrics from an accumulated precision array, as ``LVISEval.summarize``.

    Args:
        precision (ndarray[T, R, K, A]): precision at T IoU thresholds, R recall thresholds, K
            categories (sorted by id), A area ranges (all, small, medium, large); -1 where a
            category has no ground truth.
        iou_thrs (ndarray[T]): the IoU thresholds (0.5:0.05:0.95).
        category_frequencies (list[str]): "r" / "c" / "f" of each of the K categories.

    Returns:
        dict[str, float]: the keys of :data:`LVIS_METRICS`, in [0, 1], or -1 where nothing counts.
    """

    def mean_valid(s):
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    def at_iou(thr):
        return precision[np.where(np.isclose(iou_thrs, thr))[0]]

    groups = {
        g: [k for k, f in enumerate(category_frequencies) if f == g] for g in _FREQUENCY_GROUPS
    }
    return {
        "AP": mean_valid(precision[..., 0]),
        "AP50": mean_valid(at_iou(0.5)[..., 0]),
        "AP75": mean_valid(at_iou(0.75)[..., 0]),
        "APs": mean_valid(precision[..., 1]),
        "APm": mean_valid(precision[..., 2]),
        "APl": mean_valid(precision[..., 3]),
        "APr": mean_valid(precision[:, :, groups["r"], 0]),
        "APc": mean_valid(precision[:, :, groups["c"], 0]),
        "APf": mean_valid(precision[:, :, groups["f"], 0]),
    }


def per_category_ap(precision):
    """
    Args:
        precision (ndarray[T, R, K, A]): as in :func:`summarize_lvis_precision`.

    Returns:
        ndarray[K]: AP (IoU 0.5:0.95, all areas) of each category, in [0, 1]; NaN without ground
        truth.
    """
    s = precision[..., 0]
    valid = s > -1
    count = valid.sum(axis=(0, 1))
    total = np.where(valid, s, 0.0).sum(axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _evaluate_faster(gt, results, iou_type, max_dets_per_image):
    from faster_coco_eval import COCOeval_faster

    results = limit_dets_per_image(results, max_dets_per_image)
    if max_dets_per_image < 0:
        per_image = defaultdict(int)
        for ann in results:
            per_image[ann["image_id"]] += 1
        max_dets_per_image = max(per_image.values())
    # COCOeval_faster's lvis_style would drop these itself, but it still rasterises their masks and
    # fails (unordered_map::at) on an image with neither ground truth nor judged detections.
    dt = _faster_results(gt, federated_filter(gt, results), iou_type)
    coco_eval = COCOeval_faster(gt, dt, iou_type, lvis_style=True, print_function=logger.debug)
    coco_eval.params.maxDets = [max_dets_per_image]
    # Only categories with ground truth can score: LVISEval leaves the others' precision at -1,
    # which
    # every summary skips. Evaluating them anyway costs a (image, category) pair each, which on LVIS
    # with 1,203 categories is most of the C++ time. Their per-class AP is NaN, as the lvis API's.
    all_cat_ids = sorted(gt.cats)
    with_gt = sorted({ann["category_id"] for ann in gt.dataset["annotations"]})
    if with_gt:
        coco_eval.params.catIds = with_gt
    # summarize_lvis_precision indexes area ranges by position, as LVISEval lays them out.
    assert tuple(coco_eval.params.areaRngLbl) == _AREA_LABELS, coco_eval.params.areaRngLbl
    coco_eval.evaluate()
    coco_eval.accumulate()
    precision = np.asarray(coco_eval.eval["precision"])[..., -1]  # [T, R, K, A], the only maxDets
    cat_ids = coco_eval.params.catIds
    frequencies = [gt.cats[c]["frequency"] for c in cat_ids]
    metrics = summarize_lvis_precision(precision, coco_eval.params.iouThrs, frequencies)
    ap = dict.fromkeys(all_cat_ids, float("nan"))
    ap.update(zip(cat_ids, per_category_ap(precision)))
    return metrics, ap


def _evaluate_lvis_api(lvis_gt, results, iou_type, max_dets_per_image):
    patch_lvis_numpy()
    from lvis import LVISEval, LVISResults

    lvis_results = LVISResults(lvis_gt, results, max_dets=max_dets_per_image)
    lvis_eval = LVISEval(lvis_gt, lvis_results, iou_type)
    lvis_eval.run()
    lvis_eval.print_results()
    metrics = {k: float(lvis_eval.get_results()[k]) for k in LVIS_METRICS}
    ap = per_category_ap(lvis_eval.eval["precision"])
    return metrics, dict(zip(lvis_eval.params.cat_ids, ap))


def _copy_results(results, iou_type):
    """
    Copies of the detections that the evaluators may modify. Both only add or replace top-level
    keys, so shallow copies suffice (a deep copy of 600k detections costs more than the whole C++
    evaluation). For "segm" the box is dropped, as detectron2 does, so that mask AP uses mask area.
    """
    results = [dict(r) for r in results]
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    return results


@contextlib.contextmanager
def _cyclic_gc_paused():
    """
    Pause Python's cyclic garbage collector. Evaluation allocates millions of small dicts and lists
    (no reference cycles), which triggers repeated full collections over the whole heap: on 300
    LVIS-style images x 300 detections they took half of the evaluation time. Reference counting
    still frees everything; the collector is re-enabled (if it was) on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def evaluate_lvis(
    lvis_gt, results, iou_type, *, max_dets_per_image=300, backend="faster", faster_gt=None
):
    """
    LVIS metrics of detections, with either backend.

    Args:
        lvis_gt (lvis.LVIS): the ground truth (for the "lvis" backend, and for the "faster" one
            when ``faster_gt`` is not given).
        results (list[dict]): detections in LVIS result format (dataset category ids); not modified.
        iou_type (str): "bbox" or "segm".
        max_dets_per_image (int): per-image limit over all categories (LVIS: 300); negative: none.
        backend (str): "faster" (faster-coco-eval, C++) or "lvis" (the reference Python API).
        faster_gt (faster_coco_eval.COCO or None): a cached :func:`faster_lvis_ground_truth`.

    Returns:
        tuple[dict, dict]: metrics (keys :data:`LVIS_METRICS`, in percent; -100 for an empty group
        and NaN for all when ``results`` is empty, as detectron2's evaluator), and
        {dataset category id: AP in percent, NaN for categories without ground truth}.
    """
    if backend not in LVIS_BACKENDS:
        raise ValueError(
            f"Unknown LVIS evaluation backend {backend!r}; expected one of {LVIS_BACKENDS}."
        )
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}.")
    if max_dets_per_image == 0:
        raise ValueError(
            "max_dets_per_image (TEST.DETECTIONS_PER_IMAGE) must be positive, or negative for no "
            "limit."
        )
    if len(results) == 0:
        logger.warning("No predictions from the model!")
        return {k: float("nan") for k in LVIS_METRICS}, {}
    unknown = {r["image_id"] for r in results} - set(lvis_gt.imgs)
    if unknown:
        raise ValueError(
            f"Detections refer to image ids {sorted(unknown)[:10]} that are not in the ground "
            "truth."
        )
    if backend == "faster":
        with _cyclic_gc_paused():
            if faster_gt is None:
                faster_gt = faster_lvis_ground_truth(lvis_gt.dataset)
            metrics, ap = _evaluate_faster(
                faster_gt, _copy_results(results, iou_type), iou_type, max_dets_per_image
            )
    else:
        metrics, ap = _evaluate_lvis_api(
            lvis_gt, _copy_results(results, iou_type), iou_type, max_dets_per_image
        )
    metrics = {k: float(metrics[k] * 100) for k in LVIS_METRICS}
    return metrics, {int(c): float(v * 100) for c, v in ap.items()}


class LVISEvaluator(_D2LVISEvaluator):
    """
    detectron2's :class:`~detectron2.evaluation.LVISEvaluator` with a choice of scoring backend, a
    per-class report, and columnar predictions.

    Outputs, as detectron2's: ``{"bbox": {...}, "segm": {...}}`` with :data:`LVIS_METRICS` in
    percent. With ``output_dir``: ``lvis_instances_results.json`` (the same detections as
    detectron2's, written with orjson), ``instances_predictions.pth`` (the same predictions, as one
    tensor per field rather than detectron2's pickled list of dicts: read it with
    :func:`drcl2.evaluation.load_predictions`), ``per_class_ap.csv`` and ``per_class_ap.png``
    (per-class AP against training image count). :meth:`evaluate_file` evaluates a saved
    predictions file (drcl2's or detectron2's) again, with the same numbers.

    ``process`` keeps each image's detections as a few arrays (:func:`instances_to_columns`: the
    masks RLE-encoded inside their boxes, byte-identical to pycocotools) instead of a dict per
    detection; ``evaluate`` builds the LVIS result dicts once, for the json and the scoring.
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        max_dets_per_image=None,
        backend="faster",
        train_dataset_names=None,
    ):
        """
        Args:
            dataset_name, tasks, distributed, output_dir, max_dets_per_image: as detectron2's
                LVISEvaluator (``max_dets_per_image`` None means LVIS's 300).
            backend (str): "faster" (faster-coco-eval's C++ LVIS mode) or "lvis" (the reference
                ``lvis`` API); config key ``TEST.DRCL2.LVIS_BACKEND``.
            train_dataset_names (list[str] or None): the training datasets (drcl2's Trainer passes
                ``DATASETS.TRAIN``). Categories of the evaluated json without ``frequency`` get
                their r/c/f group from these datasets' training image counts (metadata
                ``class_image_count``); default: the evaluated dataset's metadata
                ``train_dataset_name``, if set; without either, from the json's own image counts
                (with a warning). See :func:`complete_lvis_ground_truth`.
        """
        if backend not in LVIS_BACKENDS:
            raise ValueError(
                f"TEST.DRCL2.LVIS_BACKEND / backend must be one of {LVIS_BACKENDS}, got "
                f"{backend!r}."
            )
        patch_lvis_numpy()
        super().__init__(
            dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image
        )
        self._backend = backend
        self._faster_gt = None
        self._first_instances = None
        self._dataset_name = dataset_name
        if train_dataset_names is None and self._metadata.get("train_dataset_name", None):
            train_dataset_names = [self._metadata.train_dataset_name]
        train_dataset_names = list(train_dataset_names or [])
        # A custom json may lack the frequency groups and the federated fields: complete the ground
        # truth in place, before either backend (or the per-class report) reads it.
        complete_lvis_ground_truth(
            self._lvis_api.dataset,
            training_image_counts(train_dataset_names),
            train_source=train_dataset_names,
            source=self._metadata.json_file,
        )

    def reset(self):
        super().reset()
        self._first_instances = None  # (image id, has masks) of the first image with instances

    def _check_masks(self, image_id, has_masks):
        """Masks for every image or for none: fail at the first image that breaks the rule."""
        if self._tasks is not None and "segm" in self._tasks and not has_masks:
            raise ValueError(
                f"LVISEvaluator of {self._dataset_name}: tasks include 'segm' but the model gave "
                f"no 'pred_masks' for image {image_id}. Evaluate boxes only (tasks=('bbox',)) or "
                "check the model's mask head (MODEL.MASK_ON)."
            )
        if self._first_instances is None:
            self._first_instances = (image_id, has_masks)
        elif self._first_instances[1] != has_masks:
            first_id, first_has = self._first_instances
            with_masks, without = (first_id, image_id) if first_has else (image_id, first_id)
            raise ValueError(
                f"LVISEvaluator of {self._dataset_name}: the model gave 'pred_masks' for image "
                f"{with_masks} but not for image {without}. Mask evaluation needs a mask for every "
                "detection of every image: a model must give masks for all images or for none."
            )

    def process(self, inputs, outputs):
        """
        As detectron2's, but each image's instances are kept as columns
        (:func:`instances_to_columns`). A model that gives masks for some images and not for others
        is refused at the first such image (ValueError naming both), not when the segm evaluation
        meets it at the end; an image without detections is judged by neither rule.
        """
        for input, output in zip(inputs, outputs):
            prediction = {"image_id": input["image_id"]}
            if "instances" in output:
                instances = output["instances"]
                if len(instances):  # an image without detections has no masks to lack
                    self._check_masks(input["image_id"], instances.has("pred_masks"))
                pixel_counts = None
                if instances.has("pred_masks") and instances.pred_masks.device.type != "cpu":
                    # counted where the masks are (free on a GPU); the encoder checks them
                    pixel_counts = instances.pred_masks.flatten(1).sum(1).cpu().numpy()
                prediction["instances"] = instances_to_columns(
                    instances.to(self._cpu_device), pixel_counts=pixel_counts
                )
            if "proposals" in output:
                prediction["proposals"] = output["proposals"].to(self._cpu_device)
            self._predictions.append(prediction)

    def evaluate(self):
        """As detectron2's; the predictions file is columnar (:func:`save_predictions`)."""
        if self._distributed:
            comm.synchronize()
            predictions = comm.gather(self._predictions, dst=0)
            predictions = list(itertools.chain(*predictions))
            if not comm.is_main_process():
                return
        else:
            predictions = self._predictions
        return self._evaluate_all(predictions, save=True)

    def evaluate_file(self, path):
        """
        The metrics of saved predictions, the same as :meth:`evaluate` gave for them live: drcl2's
        ``instances_predictions.pth`` or detectron2's, read with :func:`load_predictions` (images
        without detections included). On this process alone, whatever ``distributed``. With
        ``output_dir``, the json and the per-class report are written there again, the predictions
        file is not (it may be the one read).
        """
        self.reset()
        self._predictions = load_predictions(path)
        return self._evaluate_all(self._predictions, save=False)

    def _evaluate_all(self, predictions, save):
        """:meth:`evaluate` on gathered predictions; ``save``: write instances_predictions.pth."""
        if len(predictions) == 0:
            self._logger.warning("[LVISEvaluator] Did not receive valid predictions.")
            return {}
        predictions = [_as_columns(p) for p in predictions]

        with _cyclic_gc_paused():
            if self._output_dir:
                PathManager.mkdirs(self._output_dir)
            if self._output_dir and save:
                save_predictions(
                    predictions, os.path.join(self._output_dir, "instances_predictions.pth")
                )

            self._results = OrderedDict()
            if "proposals" in predictions[0]:
                self._eval_box_proposals(predictions)
            if "instances" in predictions[0]:
                self._eval_predictions(predictions)
        return copy.deepcopy(self._results)

    def _category_id_map(self):
        """A function: the model's contiguous class ids (int64 array) -> the dataset's category
        ids."""
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping is None:
            return lambda classes: classes + 1  # LVIS: 0-indexed -> 1-indexed, as detectron2
        lut = np.full(max(mapping.values()) + 1, -1, dtype=np.int64)
        for dataset_id, contiguous in mapping.items():
            lut[contiguous] = dataset_id

        def to_dataset(classes):
            if len(classes) and (
                classes.min() < 0 or classes.max() >= len(lut) or (lut[classes] < 0).any()
            ):
                bad = sorted(set(classes.tolist()) - set(mapping.values()))
                raise KeyError(
                    f"predicted classes {bad[:10]} are not in thing_dataset_id_to_contiguous_id"
                )
            return lut[classes]

        return to_dataset

    def _eval_predictions(self, predictions):
        """Fill ``self._results`` with the metrics of each task and write the per-class report."""
        self._logger.info("Preparing results in the LVIS format ...")
        predictions = [_as_columns(p) for p in predictions]
        to_dataset = self._category_id_map()
        lvis_results = []
        # has masks -> an image id with detections (a gathered or loaded set can mix them, too).
        # An image without detections has no masks to lack: saved files keep no masks for it
        # (detectron2's list holds [] for it, whatever the model gave), so it counts for neither.
        masks_of = {}
        for p in predictions:
            columns = p["instances"]
            if len(columns["scores"]):
                masks_of.setdefault(columns["rles"] is not None, p["image_id"])
            lvis_results.extend(
                columns_to_coco_json(columns, p["image_id"], to_dataset(columns["classes"]))
            )
        if len(masks_of) == 2:
            raise ValueError(
                f"LVISEvaluator of {self._dataset_name}: the predictions have masks for image "
                f"{masks_of[True]} but not for image {masks_of[False]}. Mask evaluation needs a "
                "mask for every detection of every image: a model must give masks for all images "
                "or for none."
            )
        has_masks = True in masks_of
        tasks = self._tasks or (("bbox", "segm") if has_masks else ("bbox",))
        if "segm" in tasks and False in masks_of:
            raise ValueError(
                f"LVISEvaluator of {self._dataset_name}: tasks include 'segm' but the predictions "
                f"have no masks (image {masks_of[False]}). Evaluate boxes only (tasks=('bbox',))."
            )

        if self._output_dir:
            file_path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info("Saving results to {}".format(file_path))
            dump_json(lvis_results, file_path)

        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return

        max_dets = 300 if self._max_dets_per_image is None else self._max_dets_per_image
        if self._backend == "faster" and self._faster_gt is None:
            self._faster_gt = faster_lvis_ground_truth(
                self._lvis_api.dataset, source=self._metadata.json_file
            )
        self._logger.info(
            f"Evaluating predictions with the '{self._backend}' backend, "
            f"max detections per image = {max_dets} ..."
        )
        per_class = {}
        for task in sorted(tasks):
            metrics, per_class[task] = evaluate_lvis(
                self._lvis_api,
                lvis_results,
                task,
                max_dets_per_image=max_dets,
                backend=self._backend,
                faster_gt=self._faster_gt,
            )
            self._logger.info(f"Evaluation results for {task}: \n" + create_small_table(metrics))
            self._results[task] = metrics
        self._per_class_ap = per_class

        if self._output_dir:
            rows = lvis_per_class_rows(
                self._metadata, self._lvis_api.dataset["categories"], per_class
            )
            write_per_class_report(
                rows,
                self._output_dir,
                x_key="train_image_count",
                x_label="training images per class",
                title=f"{self._dataset_name}: per-class AP",
            )


def _as_columns(prediction):
    """A prediction whose "instances" are columns (detectron2's list of dicts is converted)."""
    instances = prediction.get("instances")
    if instances is None or isinstance(instances, dict):
        return prediction
    return dict(prediction, instances=columns_from_coco_json(instances))
