"""
Precomputed class-agnostic proposals as LCL's boxes (``MODEL.DRCL2.LCL.BOX_SOURCE: "proposals"``).

The files are detectron2's proposal files (a pickled dict with ``ids``, ``boxes``,
``objectness_logits`` and ``bbox_mode``), loaded by detectron2 itself into the dataset dicts
(``DATASETS.PROPOSAL_FILES_TRAIN`` with ``MODEL.LOAD_PROPOSALS: True``): each dict then carries
``proposal_boxes``, ``proposal_objectness_logits`` (sorted by decreasing objectness) and
``proposal_bbox_mode``. ``python -m drcl2.tools.dump_proposals`` writes such files.

This module checks the files before detectron2 reads them (detectron2 fails on a missing image id
with a bare ``KeyError``), picks the top proposals of an image and labels them with the annotated
boxes they overlap.
"""

import pickle
from typing import Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.file_io import PathManager

__all__ = [
    "UNLABELLED",
    "PROPOSAL_BOX_MODES",
    "read_proposal_file",
    "check_proposal_files",
    "top_proposals",
    "label_proposals",
]

UNLABELLED = -1  # gt_classes of a proposal that overlaps no annotated box enough
# Box modes a proposal file may declare: absolute pixel boxes, as every detectron2 RPN writes.
PROPOSAL_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


def read_proposal_file(proposal_file: str) -> dict:
    """
    Read and check one detectron2 proposal file.

    Returns:
        the file's dict (``ids``, ``boxes``, ``objectness_logits``, ``bbox_mode``; D1's
        ``indexes`` / ``scores`` are accepted under detectron2's names too).

    Raises:
        ValueError naming ``proposal_file`` and what is wrong (unreadable, missing keys, lengths
        that differ, boxes that are not ``[R, 4]``, a box mode other than XYXY_ABS / XYWH_ABS).
    """

    def fail(why):
        raise ValueError(
            f"Proposal file '{proposal_file}' (DATASETS.PROPOSAL_FILES_TRAIN): {why} Write "
            "proposal files with `python -m drcl2.tools.dump_proposals` (detectron2's format)."
        )

    if not PathManager.exists(proposal_file):
        fail("does not exist.")
    try:
        with PathManager.open(proposal_file, "rb") as f:
            proposals = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 (any unpickling failure means "not a proposal file")
        fail(f"cannot be read as a pickle ({type(e).__name__}: {e}).")
    if not isinstance(proposals, dict):
        fail(f"holds a {type(proposals).__name__}, expected a dict.")
    for d1, d2 in (("indexes", "ids"), ("scores", "objectness_logits")):
        if d1 in proposals and d2 not in proposals:
            proposals[d2] = proposals[d1]
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in proposals]
    if missing:
        fail(f"has no {missing} (keys: {sorted(proposals)}).")
    n = len(proposals["ids"])
    if len(proposals["boxes"]) != n or len(proposals["objectness_logits"]) != n:
        fail(
            f"'ids', 'boxes' and 'objectness_logits' must have one entry per image; got {n}, "
            f"{len(proposals['boxes'])} and {len(proposals['objectness_logits'])}."
        )
    mode = proposals.get("bbox_mode", BoxMode.XYXY_ABS)
    try:
        mode = BoxMode(mode)
    except ValueError:
        mode = None
    if mode not in PROPOSAL_BOX_MODES:
        fail(
            f"bbox_mode {proposals.get('bbox_mode')!r} is not supported; proposals must be "
            f"absolute pixel boxes: BoxMode.XYXY_ABS ({int(BoxMode.XYXY_ABS)}) or XYWH_ABS "
            f"({int(BoxMode.XYWH_ABS)})."
        )
    for image_id, boxes, logits in zip(
        proposals["ids"], proposals["boxes"], proposals["objectness_logits"]
    ):
        boxes, logits = np.asarray(boxes), np.asarray(logits)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or logits.shape != (len(boxes),):
            fail(
                f"image {image_id!r}: expected boxes [R, 4] and objectness_logits [R]; got "
                f"{boxes.shape} and {logits.shape}."
            )
    return proposals


def check_proposal_files(dataset_names: Sequence[str], proposal_files: Sequence[str]) -> None:
    """
    Check ``DATASETS.PROPOSAL_FILES_TRAIN`` against ``DATASETS.TRAIN`` before detectron2 loads
    them: one file per dataset, each readable (:func:`read_proposal_file`) and holding every image
    id of its dataset.

    Raises:
        ValueError naming the file (or the keys) and how to fix it.
    """
    if len(proposal_files) != len(dataset_names):
        raise ValueError(
            f"DATASETS.PROPOSAL_FILES_TRAIN = {tuple(proposal_files)} must name one proposal file "
            f"per dataset of DATASETS.TRAIN = {tuple(dataset_names)}."
        )
    for name, path in zip(dataset_names, proposal_files):
        ids = {str(i) for i in read_proposal_file(path)["ids"]}
        missing = [d["image_id"] for d in DatasetCatalog.get(name) if str(d["image_id"]) not in ids]
        if missing:
            raise ValueError(
                f"Proposal file '{path}' has no proposals for {len(missing)} image(s) of dataset "
                f"'{name}' (e.g. image ids {missing[:5]}). Make it for this dataset: "
                f"python -m drcl2.tools.dump_proposals ... --dataset {name} --output {path}"
            )


def top_proposals(dataset_dict: dict, topk: int) -> np.ndarray:
    """
    The ``topk`` proposals of highest objectness of one image, as loaded by detectron2.

    Args:
        dataset_dict: a dataset dict with ``proposal_boxes`` (ndarray[R, 4] in
            ``proposal_bbox_mode``) and ``proposal_objectness_logits`` (ndarray[R]).
        topk: how many to keep.

    Returns:
        ndarray[min(topk, R), 4] float64, XYXY_ABS in the original image, by decreasing objectness.
    """
    boxes = np.asarray(dataset_dict["proposal_boxes"], dtype=np.float64).reshape(-1, 4)
    logits = np.asarray(dataset_dict["proposal_objectness_logits"], dtype=np.float64).reshape(-1)
    order = np.argsort(-logits, kind="stable")[:topk]
    mode = dataset_dict.get("proposal_bbox_mode", BoxMode.XYXY_ABS)
    return np.asarray(
        BoxMode.convert(boxes[order], mode, BoxMode.XYXY_ABS), dtype=np.float64
    ).reshape(-1, 4)


def label_proposals(
    proposal_boxes: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """
    The class of each proposal: that of the annotated box it overlaps most, if that IoU is at
    least ``iou_threshold``, else :data:`UNLABELLED` (-1).

    Args:
        proposal_boxes: ndarray[P, 4] XYXY_ABS.
        gt_boxes: ndarray[G, 4] XYXY_ABS (non-crowd annotations).
        gt_classes: ndarray[G] int.
        iou_threshold: the IoU from which a proposal takes the class.

    Returns:
        ndarray[P] int64.
    """
    labels = np.full(len(proposal_boxes), UNLABELLED, dtype=np.int64)
    if len(proposal_boxes) == 0 or len(gt_boxes) == 0:
        return labels
    iou = pairwise_iou(
        Boxes(torch.as_tensor(proposal_boxes, dtype=torch.float32)),
        Boxes(torch.as_tensor(gt_boxes, dtype=torch.float32)),
    ).numpy()  # [P, G]
    best = iou.argmax(axis=1)
    matched = iou[np.arange(len(best)), best] >= iou_threshold
    labels[matched] = np.asarray(gt_classes, dtype=np.int64)[best[matched]]
    return labels
