"""
The two-view mapper of 2DRCL pre-training (docs/method.md, "One pre-training step, as implemented").

Two backends (``INPUT.DRCL2.AUG_BACKEND``) draw the same augmentations from the same random streams:

* ``"opencv"`` (default): crop + resize + flip rendered with OpenCV on the decoded uint8 image
  (bilinear upscaling equals PIL's to 1 grey level; a resize that shrinks an axis still goes
  through detectron2's PIL resize), photometric ops of :mod:`drcl2.data.view_ops` on uint8 in the
  image's own channel order.
* ``"torchvision"``: the reference: each detectron2 transform's ``apply_image`` and torchvision v2's
  photometric transforms on a uint8 RGB tensor (:func:`build_view_photometric`); about 10x slower.
"""

import copy
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances
from torchvision.transforms import v2 as TV

from .proposals import label_proposals, top_proposals
from .view_ops import FastViewPhotometric

__all__ = [
    "AUG_BACKENDS",
    "RandomResizedCropAugmentation",
    "TwoViewDatasetMapper",
    "build_view_photometric",
    "render_geometric",
]

AUG_BACKENDS = ("opencv", "torchvision")

logger = logging.getLogger(__name__)


class RandomResizedCropAugmentation(T.Augmentation):
    """
    The crop of torchvision's ``RandomResizedCrop`` as a detectron2 augmentation: a window covering
    a random fraction ``scale`` of the image area with aspect ratio (w / h) log-uniform in
    ``ratio``; the resize is left to a following :class:`ResizeShortestEdge`. After 10 failed draws
    it falls back to the largest centred window with an aspect ratio inside ``ratio``.
    """

    def __init__(
        self, scale: Tuple[float, float] = (0.3, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    ):
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(
                f"RandomResizedCropAugmentation: scale must satisfy 0 < lo <= hi <= 1, got {scale}"
            )
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"RandomResizedCropAugmentation: ratio must satisfy 0 < lo <= hi, got {ratio}"
            )
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = np.random.randint(0, w - cw + 1)
                y0 = np.random.randint(0, h - ch + 1)
                return T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return T.CropTransform((w - cw) // 2, (h - ch) // 2, cw, ch, orig_w=w, orig_h=h)


def build_view_photometric(
    *,
    color_jitter_prob: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_kernel_size: int,
    blur_sigma: Tuple[float, float],
    solarize_prob: float,
    solarize_threshold: int = 128,
):
    """
    MoCo/BYOL photometric augmentation of one view, from torchvision's v2 transforms, applied to a
    uint8 RGB ``Tensor[3, H, W]``: colour jitter (prob), grey (prob), Gaussian blur (prob),
    solarization (prob).
    """
    ops = []
    if color_jitter_prob > 0:
        ops.append(
            TV.RandomApply(
                [TV.ColorJitter(brightness, contrast, saturation, hue)], p=color_jitter_prob
            )
        )
    if grayscale_prob > 0:
        ops.append(TV.RandomGrayscale(p=grayscale_prob))
    if blur_prob > 0:
        ops.append(
            TV.RandomApply([TV.GaussianBlur(blur_kernel_size, sigma=blur_sigma)], p=blur_prob)
        )
    if solarize_prob > 0:
        ops.append(TV.RandomSolarize(threshold=solarize_threshold, p=solarize_prob))
    return TV.Compose(ops) if ops else None


class _ShapeInput:
    """
    Stands in for detectron2's ``AugInput`` when only the transforms are wanted: it carries the
    image *shape* through the augmentations' ``get_transform`` (as a zero-stride array, so nothing
    is allocated or resampled) and leaves the pixels to :func:`render_geometric`.
    """

    def __init__(self, shape):
        self.image = _shape_only(shape)

    def transform(self, tfm):
        h, w = self.image.shape[:2]
        if isinstance(tfm, T.CropTransform):
            h, w = tfm.h, tfm.w
        elif isinstance(tfm, T.ResizeTransform):
            h, w = tfm.new_h, tfm.new_w
        elif not isinstance(tfm, (T.HFlipTransform, T.VFlipTransform, T.NoOpTransform)):
            h, w = tfm.apply_image(np.zeros(self.image.shape, np.uint8)).shape[:2]
        self.image = _shape_only((h, w) + self.image.shape[2:])


def _shape_only(shape):
    return np.broadcast_to(np.zeros((1,) * len(shape), np.uint8), shape)


def render_geometric(image: np.ndarray, transforms) -> np.ndarray:
    """
    ``transforms.apply_image(image)`` for a crop / resize / flip chain, with OpenCV: the crop is a
    view, a bilinear resize that enlarges both axes is ``cv2.resize`` (PIL's bilinear upscaling to
    1 grey level), a flip is ``cv2.flip``. Any other transform, and a resize that shrinks an axis
    (where PIL's bilinear filter antialiases and OpenCV's does not), uses the transform's own
    ``apply_image``.
    """
    out = image
    for t in transforms.transforms:
        if isinstance(t, T.CropTransform):
            out = out[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w]
        elif isinstance(t, T.NoOpTransform):
            continue
        elif (
            isinstance(t, T.ResizeTransform)
            and out.dtype == np.uint8
            and out.ndim == 3
            and t.interp == T.Resize((1, 1)).interp  # bilinear
            and t.new_h >= t.h
            and t.new_w >= t.w
        ):
            out = cv2.resize(out, (t.new_w, t.new_h), interpolation=cv2.INTER_LINEAR)
        elif isinstance(t, (T.HFlipTransform, T.VFlipTransform)) and out.ndim == 3:
            out = cv2.flip(np.ascontiguousarray(out), 1 if isinstance(t, T.HFlipTransform) else 0)
        else:
            out = t.apply_image(np.ascontiguousarray(out))
    return np.ascontiguousarray(out)


class TwoViewDatasetMapper:
    """
    Maps one detectron2 dataset dict to the two augmented views of 2DRCL pre-training.

    The image is decoded once. Each view takes its own geometric augmentations (by default a random
    resized crop, detectron2's ResizeShortestEdge and flip) and its own photometric ones (colour
    jitter, grey, blur, solarization). Every non-crowd instance box is carried into both views; an
    instance is kept when at least ``min_visible`` of its area survives the crop of *both* views and
    each side of its box is at least ``min_side`` pixels in both views. Kept instances keep their
    order, so row i of both views' ``instances`` is the same object (``gt_ids`` = its index in the
    dict's ``annotations``). An image with no kept instance yields empty ``instances``.

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
        photometric1=None,
        photometric2=None,
        image_format: str = "BGR",
        min_visible: float = 0.3,
        min_side: float = 4.0,
        proposal_topk: Optional[int] = None,
        proposal_match_iou: float = 0.5,
        backend: str = "opencv",
        shared_geometry: bool = False,
        mask_on: bool = False,
        mask_format: str = "polygon",
    ):
        """
        Args:
            is_train: must be True (two views are a training-time construct).
            geometric1, geometric2: detectron2 augmentations of each view; at most one
                :class:`CropTransform` per view is expected to drop pixels (used for
                ``min_visible``).
            photometric1, photometric2: a :class:`~drcl2.data.view_ops.FastViewPhotometric` (on
                the uint8 HWC image in ``image_format``), callables on a uint8 RGB
                Tensor[3, H, W] (e.g. from :func:`build_view_photometric`), or None.
            image_format: detectron2 image format of the output images (``INPUT.FORMAT``).
            min_visible: the fraction of a box's area that must survive each view's crop.
            min_side: the smallest side (pixels, in the view) of a kept box.
            proposal_topk: carry this many precomputed proposals per image (by objectness) into
                the views as ``"proposals"``; None: proposals are not used.
            proposal_match_iou: the IoU with an annotated box from which a proposal takes its class.
            backend: "opencv" renders the geometric transforms with :func:`render_geometric`;
                "torchvision" with each transform's ``apply_image`` (the reference).
            shared_geometry: view 2 takes view 1's geometric transforms (``geometric2`` unused).
            mask_on: view 1's ``targets`` carry ``gt_masks`` (``mask_format``, as detectron2's
                ``INPUT.MASK_FORMAT``; polygons cut by a crop become bitmasks).
        """
        if not is_train:
            raise ValueError("TwoViewDatasetMapper is for training only (is_train=True).")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"INPUT.DRCL2.MIN_VISIBLE must lie in [0, 1]; got {min_visible}.")
        if backend not in AUG_BACKENDS:
            raise ValueError(
                f"INPUT.DRCL2.AUG_BACKEND must be one of {AUG_BACKENDS}; got {backend!r}."
            )
        for op in (photometric1, photometric2):
            if isinstance(op, FastViewPhotometric) and op.channel_order != image_format:
                raise ValueError(
                    f"TwoViewDatasetMapper: a FastViewPhotometric for {op.channel_order!r} images "
                    f"cannot augment INPUT.FORMAT {image_format!r} images."
                )
        self.backend = backend
        self._threads_pid = None
        self.timings: Optional[Dict[str, List[float]]] = None
        self.geometric = (T.AugmentationList(geometric1), T.AugmentationList(geometric2))
        self.photometric = (photometric1, photometric2)
        self.image_format = image_format
        self.min_visible = min_visible
        self.min_side = min_side
        if proposal_topk is not None and proposal_topk < 1:
            raise ValueError(f"MODEL.DRCL2.LCL.PROPOSAL_TOPK must be >= 1; got {proposal_topk}.")
        self.proposal_topk = proposal_topk
        self.proposal_match_iou = proposal_match_iou
        self.shared_geometry = shared_geometry
        self.mask_on = mask_on
        self.mask_format = mask_format
        logger.info(
            f"[TwoViewDatasetMapper] backend {backend}; view 1: {geometric1} {photometric1}"
        )
        logger.info(f"[TwoViewDatasetMapper] view 2: {geometric2} {photometric2}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        d = cfg.INPUT.DRCL2
        _check_view_config(d)
        lcl = cfg.MODEL.DRCL2.LCL

        def crop(view):
            """The random resized crop of a view, taken with probability CROP_PROB[view]."""
            prob = d.CROP_PROB[view]
            if prob <= 0:
                return []
            aug = RandomResizedCropAugmentation(tuple(d.CROP_SCALE), tuple(d.CROP_RATIO))
            return [aug] if prob >= 1 else [T.RandomApply(aug, prob)]

        if d.AUG_BACKEND == "opencv":
            if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
                raise ValueError(
                    "INPUT.DRCL2.AUG_BACKEND 'opencv' augments INPUT.FORMAT 'BGR' or 'RGB' "
                    f"images; got {cfg.INPUT.FORMAT!r}."
                )
            photometric = lambda **kw: FastViewPhotometric(channel_order=cfg.INPUT.FORMAT, **kw)  # noqa
        else:
            photometric = build_view_photometric
        common = dict(
            color_jitter_prob=d.COLOR_JITTER_PROB,
            brightness=d.BRIGHTNESS,
            contrast=d.CONTRAST,
            saturation=d.SATURATION,
            hue=d.HUE,
            grayscale_prob=d.GRAYSCALE_PROB,
            blur_kernel_size=d.BLUR_KERNEL_SIZE,
            blur_sigma=tuple(d.BLUR_SIGMA),
        )
        return {
            "is_train": is_train,
            "geometric1": crop(0) + utils.build_augmentation(cfg, True),
            "geometric2": crop(1) + utils.build_augmentation(cfg, True),
            "photometric1": photometric(
                blur_prob=d.BLUR_PROB[0], solarize_prob=d.SOLARIZE_PROB[0], **common
            )
            if d.VIEW1_PHOTOMETRIC
            else None,
            "photometric2": photometric(
                blur_prob=d.BLUR_PROB[1], solarize_prob=d.SOLARIZE_PROB[1], **common
            ),
            "image_format": cfg.INPUT.FORMAT,
            "min_visible": d.MIN_VISIBLE,
            "min_side": d.MIN_SIDE,
            "proposal_topk": lcl.PROPOSAL_TOPK if lcl.BOX_SOURCE == "proposals" else None,
            "proposal_match_iou": lcl.PROPOSAL_MATCH_IOU,
            "backend": d.AUG_BACKEND,
            "shared_geometry": d.SHARED_GEOMETRY,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def enable_timings(self) -> Dict[str, List[float]]:
        """
        Collect the seconds of each part of every call from now on (decode, geometric, each
        photometric op, to tensor; for ``python -m drcl2.tools.benchmark mapper``) and return the
        dict they go to: ``{part: [seconds, ...]}``. Photometric ops are split only for
        :class:`FastViewPhotometric`; torchvision's pipeline is one "photometric" part.
        """
        self.timings = {}
        for op in self.photometric:
            if isinstance(op, FastViewPhotometric):
                op.timings = self.timings
        return self.timings

    def _tick(self, name: str, start: float) -> float:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings.setdefault(name, []).append(now - start)
        return now

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
        if transforms is not None:
            view_image = (
                render_geometric(image, transforms)
                if self.backend == "opencv"
                else transforms.apply_image(image)
            )
        elif self.backend == "opencv":
            transforms = self.geometric[view](_ShapeInput(image.shape))
            view_image = render_geometric(image, transforms)
        else:
            aug_input = T.AugInput(image)
            transforms = self.geometric[view](aug_input)
            view_image = aug_input.image
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
        h, w = view_image.shape[:2]
        view_boxes[:, [0, 2]] = view_boxes[:, [0, 2]].clip(0, w)
        view_boxes[:, [1, 3]] = view_boxes[:, [1, 3]].clip(0, h)
        return view_image, view_boxes, visible, transforms

    def _photometric(self, image: np.ndarray, view: int) -> np.ndarray:
        op = self.photometric[view]
        if op is None:
            return image
        if isinstance(op, FastViewPhotometric):
            return op(image)
        rgb = (
            utils.convert_image_to_rgb(image, self.image_format)
            if self.image_format != "RGB"
            else image
        )
        rgb = torch.from_numpy(
            np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
        )
        rgb = op(rgb).permute(1, 2, 0).numpy()
        if self.image_format == "BGR":
            return rgb[:, :, ::-1]
        if self.image_format != "RGB":
            raise ValueError(
                f"TwoViewDatasetMapper: photometric augmentation supports INPUT.FORMAT 'BGR' or "
                f"'RGB'; got {self.image_format!r}."
            )
        return rgb

    def __call__(self, dataset_dict):
        if self._threads_pid != os.getpid():
            # In a DataLoader worker torch runs one thread; so should OpenCV (its own pool would put
            # cores x workers threads on the machine). Checked once per process.
            if torch.utils.data.get_worker_info() is not None:
                cv2.setNumThreads(1)
            self._threads_pid = os.getpid()
        start = time.perf_counter()
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        start = self._tick("decode", start)

        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        ids = np.array([i for i, _ in enumerate(annos)], dtype=np.int64)
        boxes = np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float64,
        ).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in annos], dtype=np.int64)
        # Proposals (if used) ride along with the annotations: rows [len(boxes):] of every view.
        proposals, proposal_classes = self._proposals(dataset_dict, boxes, classes)
        num_gt = len(boxes)

        all_boxes = np.concatenate([boxes, proposals])
        views = [self.make_view(image, all_boxes, 0)]
        views.append(
            self.make_view(image, all_boxes, 1, views[0][3] if self.shared_geometry else None)
        )
        start = self._tick("geometric (2 views)", start)
        keep = np.ones(num_gt + len(proposals), dtype=bool)
        for _, view_boxes, visible, _ in views:
            sides = np.minimum(
                view_boxes[:, 2] - view_boxes[:, 0], view_boxes[:, 3] - view_boxes[:, 1]
            )
            keep &= (visible >= self.min_visible) & (sides >= self.min_side)
        keep_proposals, keep = keep[num_gt:], keep[:num_gt]

        out = {
            k: dataset_dict[k]
            for k in ("file_name", "image_id", "height", "width")
            if k in dataset_dict
        }
        for v, (view_image, view_boxes, _, _) in enumerate(views):
            start = time.perf_counter()
            view_image = self._photometric(view_image, v)
            if not isinstance(self.photometric[v], FastViewPhotometric):
                self._tick("photometric", start)
            start = time.perf_counter()
            view_boxes, view_proposals = view_boxes[:num_gt], view_boxes[num_gt:]
            instances = Instances(view_image.shape[:2])
            instances.gt_boxes = Boxes(torch.as_tensor(view_boxes[keep], dtype=torch.float32))
            instances.gt_classes = torch.as_tensor(classes[keep], dtype=torch.int64)
            instances.gt_ids = torch.as_tensor(ids[keep], dtype=torch.int64)
            out[f"view{v + 1}"] = {
                "image": torch.as_tensor(np.ascontiguousarray(view_image.transpose(2, 0, 1))),
                "instances": instances,
            }
            if v == 0:
                out["view1"]["targets"] = self._view_targets(
                    annos, views[0][3], image.shape[:2], view_image.shape[:2]
                )
            if self.proposal_topk is not None:
                out[f"view{v + 1}"]["proposals"] = Instances(
                    view_image.shape[:2],
                    proposal_boxes=Boxes(
                        torch.as_tensor(view_proposals[keep_proposals], dtype=torch.float32)
                    ),
                    gt_classes=torch.as_tensor(proposal_classes[keep_proposals], dtype=torch.int64),
                )
            self._tick("to tensor + instances", start)
        return out

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
            mask_format = (
                "bitmask"  # detectron2 crops polygons with shapely; a bitmask needs nothing more
            )
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


def _check_view_config(d) -> None:
    """Raise ValueError naming the INPUT.DRCL2 key that holds an invalid value."""

    def fail(key, why):
        raise ValueError(f"INPUT.DRCL2.{key} = {d[key]!r}: {why}")

    if d.AUG_BACKEND not in AUG_BACKENDS:
        fail("AUG_BACKEND", f"must be one of {AUG_BACKENDS}.")
    for key in ("COLOR_JITTER_PROB", "GRAYSCALE_PROB"):
        if not 0.0 <= d[key] <= 1.0:
            fail(key, "a probability must lie in [0, 1].")
    for key in ("BLUR_PROB", "SOLARIZE_PROB"):
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
    if len(d.CROP_PROB) != 2 or not all(0.0 <= p <= 1.0 for p in d.CROP_PROB):
        fail("CROP_PROB", "expected two probabilities in [0, 1], for (view 1, view 2).")
    if not 0.0 <= d.MIN_VISIBLE <= 1.0:
        fail("MIN_VISIBLE", "must lie in [0, 1].")
    if d.MIN_SIDE < 0:
        fail("MIN_SIDE", "must be >= 0 pixels.")


def _polygons_to_rle(polygons, size) -> dict:
    """COCO RLE of the union of ``polygons`` (lists of x, y) in an image of ``size`` (h, w)."""
    from pycocotools import mask as mask_util

    h, w = size
    return mask_util.merge(
        mask_util.frPyObjects([np.asarray(p, dtype=np.float64).tolist() for p in polygons], h, w)
    )


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)
