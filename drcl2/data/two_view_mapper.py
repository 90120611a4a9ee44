"""
The two-view mapper of 2DRCL pre-training (docs/method.md, "One pre-training step, as implemented"):
one detectron2 dataset dict -> two augmented views of its image, with the boxes that survive both.

The augmentations are drawn by detectron2's augmentations and rendered on the decoded uint8 image
by the OpenCV / NumPy ops of :mod:`drcl2.data.view_ops`. Each part of a call runs under a
``torch.profiler.record_function`` label (``mapper/decode``, ``mapper/geometric``,
``mapper/photometric``, ``mapper/to_tensor``; the photometric ops ``view_ops/<op>``), so that
``torch.profiler`` splits the mapper's time (``python benchmarks/benchmark.py mapper``).
"""

import copy
import logging
import os
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances
from torch.profiler import record_function

from .proposals import label_proposals, top_proposals
from .view_ops import (
    RandomResizedCropAugmentation,
    ViewPhotometric,
    draw_geometric,
    render_geometric,
)

__all__ = ["TwoViewDatasetMapper"]

logger = logging.getLogger(__name__)

# A photometric augmentation: ndarray[H, W, 3] uint8 -> ndarray[H, W, 3] uint8, same channel order.
Photometric = Callable[[np.ndarray], np.ndarray]


class TwoViewDatasetMapper:
    """
    Maps one detectron2 dataset dict to the two augmented views of 2DRCL pre-training.

    The image is decoded once. Each view takes its own geometric augmentations (by default a random
    resized crop, detectron2's ResizeShortestEdge and flip) and its own photometric ones (colour
    jitter, grey, blur, solarization). Every non-crowd instance box is carried into both views; an
    instance is kept when at least ``min_visible`` of its area survives the crop of *both* views and
    each side of its box is at least ``min_side`` pixels in both views. Kept instances keep their
    order, so row i of both views' ``instances`` is the same object (``gt_ids`` = its index in the
    dict's non-crowd ``annotations``). An image with no kept instance yields empty ``instances``.

    View 1 also carries the detection targets of its own: ``"targets"`` = ``Instances(gt_boxes,
    gt_classes[, gt_masks])`` of every non-crowd annotation that survives view 1 alone, by
    detectron2's rule (``transform_instance_annotations`` + ``filter_empty_instances``: the box
    clipped to the view, kept if not empty), as detectron2's ``DatasetMapper`` would give a
    detector. The RPN and the supervised detection losses of pre-training train on these: an object
    visible in view 1 is a target there whether or not it survives view 2's crop.

    With ``shared_geometry`` both views take the same crop, resize and flip (only the photometric
    augmentations differ), so every box corresponds exactly across the views.

    With ``proposal_topk`` set (LCL's ``BOX_SOURCE: "proposals"``), the dict's precomputed proposals
    (detectron2's ``proposal_boxes`` fields, ``MODEL.LOAD_PROPOSALS``) are used too: the
    ``proposal_topk`` of highest objectness, each labelled with the class of the annotated box it
    overlaps with IoU >= ``proposal_match_iou`` (else -1, unlabelled), carried into both views with
    the same survival rule as the annotations. Each view then also holds ``"proposals"``:
    ``Instances(proposal_boxes, gt_classes)``, rows aligned across the views.

    Output dict: the input's ``file_name``, ``image_id``, ``height``, ``width`` and
    ``"view1"`` / ``"view2"``: ``{"image": Tensor[3, H_v, W_v] uint8 in ``image_format``,
    "instances": Instances(gt_boxes, gt_classes, gt_ids)}``, and ``view1["targets"]``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        geometric1: List[T.Augmentation],
        geometric2: List[T.Augmentation],
        photometric1: Optional[Photometric] = None,
        photometric2: Optional[Photometric] = None,
        image_format: str = "BGR",
        min_visible: float = 0.3,
        min_side: float = 4.0,
        proposal_topk: Optional[int] = None,
        proposal_match_iou: float = 0.5,
        shared_geometry: bool = False,
        mask_on: bool = False,
        mask_format: str = "polygon",
    ):
        """
        Args:
            is_train: must be True (two views are a training-time construct).
            geometric1, geometric2: detectron2 augmentations of each view: crops, resizes, flips
                (:func:`~drcl2.data.view_ops.render_geometric` renders them); at most one
                :class:`CropTransform` per view is expected to drop pixels (used for
                ``min_visible``).
            photometric1, photometric2: the photometric augmentation of each view, on the uint8
                ``ndarray[H, W, 3]`` in ``image_format`` (a
                :class:`~drcl2.data.view_ops.ViewPhotometric`), or None.
            image_format: detectron2 image format of the output images (``INPUT.FORMAT``).
            min_visible: the fraction of a box's area that must survive each view's crop.
            min_side: the smallest side (pixels, in the view) of a kept box.
            proposal_topk: carry this many precomputed proposals per image (by objectness) into
                the views as ``"proposals"``; None: proposals are not used.
            proposal_match_iou: the IoU with an annotated box from which a proposal takes its class.
            shared_geometry: view 2 takes view 1's geometric transforms (``geometric2`` unused).
            mask_on: view 1's ``targets`` carry ``gt_masks`` (``mask_format``, as detectron2's
                ``INPUT.MASK_FORMAT``; polygons cut by a crop become bitmasks).
        """
        if not is_train:
            raise ValueError("TwoViewDatasetMapper is for training only (is_train=True).")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"TwoViewDatasetMapper: min_visible = {min_visible}, not in [0, 1].")
        if proposal_topk is not None and proposal_topk < 1:
            raise ValueError(f"TwoViewDatasetMapper: proposal_topk = {proposal_topk}, not >= 1.")
        for op in (photometric1, photometric2):
            if isinstance(op, ViewPhotometric) and op.channel_order != image_format:
                raise ValueError(
                    f"TwoViewDatasetMapper: a ViewPhotometric for {op.channel_order!r} images "
                    f"cannot augment {image_format!r} images."
                )
        self.geometric = (T.AugmentationList(geometric1), T.AugmentationList(geometric2))
        self.photometric = (photometric1, photometric2)
        self.image_format = image_format
        self.min_visible = min_visible
        self.min_side = min_side
        self.proposal_topk = proposal_topk
        self.proposal_match_iou = proposal_match_iou
        self.shared_geometry = shared_geometry
        self.mask_on = mask_on
        self.mask_format = mask_format
        self._threads_pid = None
        logger.info(f"[TwoViewDatasetMapper] view 1: {geometric1} {photometric1}")
        logger.info(f"[TwoViewDatasetMapper] view 2: {geometric2} {photometric2}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        _check_config(cfg)
        d = cfg.INPUT.DRCL2
        lcl = cfg.MODEL.DRCL2.LCL

        def crop(view):
            """The random resized crop of a view, taken with probability CROP_PROB[view]."""
            prob = d.CROP_PROB[view]
            if prob <= 0:
                return []
            aug = RandomResizedCropAugmentation(tuple(d.CROP_SCALE), tuple(d.CROP_RATIO))
            return [aug] if prob >= 1 else [T.RandomApply(aug, prob)]

        def photometric(view):
            return ViewPhotometric(
                color_jitter_prob=d.COLOR_JITTER_PROB,
                brightness=d.BRIGHTNESS,
                contrast=d.CONTRAST,
                saturation=d.SATURATION,
                hue=d.HUE,
                grayscale_prob=d.GRAYSCALE_PROB,
                blur_prob=d.BLUR_PROB[view],
                blur_kernel_size=d.BLUR_KERNEL_SIZE,
                blur_sigma=tuple(d.BLUR_SIGMA),
                solarize_prob=d.SOLARIZE_PROB[view],
                channel_order=cfg.INPUT.FORMAT,
            )

        return {
            "is_train": is_train,
            "geometric1": crop(0) + utils.build_augmentation(cfg, True),
            "geometric2": crop(1) + utils.build_augmentation(cfg, True),
            "photometric1": photometric(0) if d.VIEW1_PHOTOMETRIC else None,
            "photometric2": photometric(1),
            "image_format": cfg.INPUT.FORMAT,
            "min_visible": d.MIN_VISIBLE,
            "min_side": d.MIN_SIDE,
            "proposal_topk": lcl.PROPOSAL_TOPK if lcl.BOX_SOURCE == "proposals" else None,
            "proposal_match_iou": lcl.PROPOSAL_MATCH_IOU,
            "shared_geometry": d.SHARED_GEOMETRY,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one detectron2 dataset dict (``file_name``, ``annotations``, ...; with
                ``proposal_boxes`` when proposals are used). Not modified.

        Returns:
            the two views (see the class docstring).
        """
        self._one_opencv_thread_per_worker()
        with record_function("mapper/decode"):
            dataset_dict = copy.deepcopy(dataset_dict)
            image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
            utils.check_image_size(dataset_dict, image)

        with record_function("mapper/geometric"):
            annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
            boxes, classes = _boxes_and_classes(annos)
            proposals, proposal_classes = self._proposals(dataset_dict, boxes, classes)
            # Proposals (if used) ride along with the annotations: rows [len(boxes):] of each view.
            all_boxes = np.concatenate([boxes, proposals])
            views = [self.make_view(image, all_boxes, 0)]
            shared = views[0][3] if self.shared_geometry else None
            views.append(self.make_view(image, all_boxes, 1, shared))
            keep = self._survivors(views)
            keep, keep_proposals = keep[: len(boxes)], keep[len(boxes) :]

        keys = ("file_name", "image_id", "height", "width")
        out = {k: dataset_dict[k] for k in keys if k in dataset_dict}
        for v, (view_image, view_boxes, _, transforms) in enumerate(views):
            view_image = self._photometric(view_image, v)
            with record_function("mapper/to_tensor"):
                size = view_image.shape[:2]
                view = {
                    "image": torch.as_tensor(np.ascontiguousarray(view_image.transpose(2, 0, 1))),
                    "instances": _instances(
                        size, view_boxes[: len(boxes)][keep], classes[keep], np.flatnonzero(keep)
                    ),
                }
                if v == 0:
                    view["targets"] = self._view_targets(annos, transforms, image.shape[:2], size)
                if self.proposal_topk is not None:
                    view["proposals"] = Instances(
                        size,
                        proposal_boxes=_boxes(view_boxes[len(boxes) :][keep_proposals]),
                        gt_classes=torch.as_tensor(
                            proposal_classes[keep_proposals], dtype=torch.int64
                        ),
                    )
                out[f"view{v + 1}"] = view
        return out

    def make_view(self, image: np.ndarray, boxes: np.ndarray, view: int, transforms=None):
        """
        Geometric augmentation of one view.

        Args:
            image: ndarray[H, W, 3] uint8 in ``image_format``.
            boxes: ndarray[R, 4] XYXY_ABS in the original image.
            view: 0 or 1.
            transforms: apply these (a TransformList of another view) instead of drawing new ones.

        Returns:
            image (ndarray[H_v, W_v, 3]), boxes (ndarray[R, 4] in the view, clipped to it),
            visible (ndarray[R], fraction of each box's area inside the crop),
            transforms (TransformList: original image -> view; ``.inverse()`` undoes it).
        """
        if transforms is None:
            transforms = draw_geometric(self.geometric[view], image.shape)
        view_image = render_geometric(image, transforms)
        view_boxes, visible = _transform_boxes(boxes, transforms, view_image.shape[:2])
        return view_image, view_boxes, visible, transforms

    def _survivors(self, views) -> np.ndarray:
        """ndarray[R] bool: the boxes of :meth:`make_view`'s ``views`` with ``min_visible`` of
        their area and sides of ``min_side`` pixels in every view."""
        keep = np.ones(len(views[0][1]), dtype=bool)
        for _, boxes, visible, _ in views:
            sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            keep &= (visible >= self.min_visible) & (sides >= self.min_side)
        return keep

    def _photometric(self, image: np.ndarray, view: int) -> np.ndarray:
        op = self.photometric[view]
        if op is None:
            return image
        with record_function("mapper/photometric"):
            return op(image)

    def _view_targets(self, annos: List[dict], transforms, original_size, image_size) -> Instances:
        """
        The detection targets of one view: every annotation in ``annos`` carried through the view's
        ``transforms`` as detectron2's ``DatasetMapper`` does, those left empty by the crop dropped.

        Args:
            annos: the image's non-crowd annotations (detectron2 dicts).
            transforms: the view's TransformList.
            original_size, image_size: (h, w) of the image and of the view.

        Returns:
            Instances(gt_boxes, gt_classes[, gt_masks]) of size ``image_size``.
        """
        mask_format = self.mask_format
        if self.mask_on and any(isinstance(t, T.CropTransform) for t in transforms.transforms):
            mask_format = "bitmask"  # detectron2 crops polygons with shapely; bitmasks need nothing
        carried = []
        for anno in annos:
            anno = {k: v for k, v in anno.items() if k != "keypoints"}
            if not self.mask_on:
                anno.pop("segmentation", None)
            elif mask_format == "bitmask" and isinstance(anno.get("segmentation"), list):
                anno["segmentation"] = _polygons_to_rle(anno["segmentation"], original_size)
            carried.append(utils.transform_instance_annotations(anno, transforms, image_size))
        targets = utils.annotations_to_instances(carried, image_size, mask_format=mask_format)
        return utils.filter_empty_instances(targets)

    def _proposals(self, dataset_dict, gt_boxes: np.ndarray, gt_classes: np.ndarray):
        """
        The proposals of one image carried into the views: the top ``proposal_topk`` by
        objectness, labelled by the annotated boxes (:func:`label_proposals`).

        Returns:
            ndarray[P, 4] XYXY_ABS in the original image, ndarray[P] int64 classes (-1: unlabelled);
            P = 0 when proposals are not used.
        """
        if self.proposal_topk is None:
            return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        if "proposal_boxes" not in dataset_dict:
            raise ValueError(
                f"TwoViewDatasetMapper: image {dataset_dict.get('image_id')!r} "
                f"({dataset_dict.get('file_name')}) has no precomputed proposals, but "
                "MODEL.DRCL2.LCL.BOX_SOURCE is 'proposals'. Set MODEL.LOAD_PROPOSALS True and "
                "DATASETS.PROPOSAL_FILES_TRAIN to one proposal file per training set (python -m "
                "drcl2.tools.dump_proposals writes them)."
            )
        proposals = top_proposals(dataset_dict, self.proposal_topk)
        return proposals, label_proposals(proposals, gt_boxes, gt_classes, self.proposal_match_iou)

    def _one_opencv_thread_per_worker(self) -> None:
        """In a DataLoader worker torch runs one thread; so should OpenCV (its own pool would put
        cores x workers threads on the machine). Checked once per process."""
        if self._threads_pid != os.getpid():
            if torch.utils.data.get_worker_info() is not None:
                cv2.setNumThreads(1)
            self._threads_pid = os.getpid()


def _check_config(cfg) -> None:
    """Raise ValueError naming the key (INPUT.FORMAT, INPUT.DRCL2.*) that holds an invalid value."""
    if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
        raise ValueError(
            f"INPUT.FORMAT = {cfg.INPUT.FORMAT!r}: 2DRCL's views augment 'BGR' or 'RGB' images."
        )
    d = cfg.INPUT.DRCL2

    def fail(key, why):
        raise ValueError(f"INPUT.DRCL2.{key} = {d[key]!r}: {why}")

    for key in ("COLOR_JITTER_PROB", "GRAYSCALE_PROB"):
        if not 0.0 <= d[key] <= 1.0:
            fail(key, "a probability must lie in [0, 1].")
    for key in ("BLUR_PROB", "SOLARIZE_PROB", "CROP_PROB"):
        if len(d[key]) != 2 or not all(0.0 <= p <= 1.0 for p in d[key]):
            fail(key, "expected two probabilities in [0, 1], for (view 1, view 2).")
    for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        if d[key] < 0:
            fail(key, "must be >= 0.")
    if not 0.0 <= d.HUE <= 0.5:
        fail("HUE", "must lie in [0, 0.5].")
    if d.BLUR_KERNEL_SIZE < 1 or d.BLUR_KERNEL_SIZE % 2 == 0:
        fail("BLUR_KERNEL_SIZE", "must be an odd number of pixels >= 1.")
    if len(d.BLUR_SIGMA) != 2 or not 0 < d.BLUR_SIGMA[0] <= d.BLUR_SIGMA[1]:
        fail("BLUR_SIGMA", "expected (min, max) with 0 < min <= max.")
    if len(d.CROP_SCALE) != 2 or not 0 < d.CROP_SCALE[0] <= d.CROP_SCALE[1] <= 1:
        fail("CROP_SCALE", "expected (min, max) area fractions with 0 < min <= max <= 1.")
    if len(d.CROP_RATIO) != 2 or not 0 < d.CROP_RATIO[0] <= d.CROP_RATIO[1]:
        fail("CROP_RATIO", "expected (min, max) aspect ratios with 0 < min <= max.")
    if not 0.0 <= d.MIN_VISIBLE <= 1.0:
        fail("MIN_VISIBLE", "must lie in [0, 1].")
    if d.MIN_SIDE < 0:
        fail("MIN_SIDE", "must be >= 0 pixels.")


def _boxes_and_classes(annos: List[dict]) -> Tuple[np.ndarray, np.ndarray]:
    """ndarray[R, 4] float64 XYXY_ABS boxes, ndarray[R] int64 classes of detectron2 annotations."""
    boxes = np.array(
        [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
        dtype=np.float64,
    ).reshape(-1, 4)
    return boxes, np.array([a["category_id"] for a in annos], dtype=np.int64)


def _transform_boxes(boxes: np.ndarray, transforms, image_size) -> Tuple[np.ndarray, np.ndarray]:
    """
    Args:
        boxes: ndarray[R, 4] XYXY_ABS in the original image.
        transforms: TransformList, original image -> view.
        image_size: (h, w) of the view.

    Returns:
        ndarray[R, 4] float64: the boxes in the view, each clipped to every crop and to the view;
        ndarray[R] float64: the fraction of each box's area inside the crops (0 for an empty box).
    """
    visible = np.ones(len(boxes), dtype=np.float64)
    clipped = boxes.astype(np.float64).copy()
    for t in transforms.transforms:
        if isinstance(t, T.CropTransform):
            window = np.array([t.x0, t.y0, t.x0 + t.w, t.y0 + t.h], dtype=np.float64)
            before = _area(clipped)
            clipped[:, :2] = np.maximum(clipped[:, :2], window[:2])
            clipped[:, 2:] = np.minimum(clipped[:, 2:], window[2:])
            clipped[:, 2:] = np.maximum(clipped[:, 2:], clipped[:, :2])
            visible = visible * np.where(
                before > 0, _area(clipped) / np.maximum(before, 1e-12), 0.0
            )
        clipped = t.apply_box(clipped) if len(clipped) else clipped
    view_boxes = clipped.reshape(-1, 4)
    h, w = image_size
    view_boxes[:, [0, 2]] = view_boxes[:, [0, 2]].clip(0, w)
    view_boxes[:, [1, 3]] = view_boxes[:, [1, 3]].clip(0, h)
    return view_boxes, visible


def _boxes(boxes: np.ndarray) -> Boxes:
    return Boxes(torch.as_tensor(boxes, dtype=torch.float32))


def _instances(image_size, boxes: np.ndarray, classes: np.ndarray, ids: np.ndarray) -> Instances:
    """Instances(gt_boxes Boxes[R], gt_classes Tensor[R] int64, gt_ids Tensor[R] int64)."""
    return Instances(
        image_size,
        gt_boxes=_boxes(boxes),
        gt_classes=torch.as_tensor(classes, dtype=torch.int64),
        gt_ids=torch.as_tensor(ids, dtype=torch.int64),
    )


def _polygons_to_rle(polygons, size) -> dict:
    """COCO RLE of the union of ``polygons`` (lists of x, y) in an image of ``size`` (h, w)."""
    from pycocotools import mask as mask_util

    h, w = size
    return mask_util.merge(
        mask_util.frPyObjects([np.asarray(p, dtype=np.float64).tolist() for p in polygons], h, w)
    )


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)
