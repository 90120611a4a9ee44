"""
Pictures of what 2DRCL pre-training trains on and of what a detector predicts, drawn with
detectron2's :class:`Visualizer`. Shared by ``python -m drcl2.tools.visualize`` and the
``VIS_PERIOD`` hook (:class:`drcl2.engine.hooks.TwoViewVisHook`).

A views picture (:func:`draw_two_views`) shows one mapped image of :class:`TwoViewDatasetMapper`,
un-normalised and enlarged to at least ``min_side`` pixels per view (an integer factor, nearest
neighbour): on the left view 1, its masked patches filled with ``MODEL.PIXEL_MEAN`` (the pixels the
model gives the reconstruction heads are 0 after normalisation: the mean); on the right view 2,
``PANEL_GAP`` white pixels apart. Pair ``i`` (row ``i`` of ``view1/instances`` and
``view2/instances``) is drawn in the same colour in both views, labelled ``"i class"``: a solid
outline when the step drew it for LCL / box-guided masking, dashed when not. View 1's detection
targets (``view1/targets``) that are not also a pair are drawn dotted in white, with their class.
"""

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

from ..modeling.draws import model_draws

__all__ = [
    "MIN_SIDE",
    "PANEL_GAP",
    "draw_predictions",
    "draw_two_views",
    "picture_scale",
    "side_by_side",
    "views_pictures",
]

MIN_SIDE = 384  # a view or image is enlarged until its longer side has at least this many pixels
PANEL_GAP = 8  # white pixels between the panels of a picture
_PAIR_COLORS = colormap(rgb=True, maximum=1)
_TARGET_COLOR = (1.0, 1.0, 1.0)
# A target of a pair's class this close to its box is that pair (not drawn twice); not 1: the
# targets' boxes go through detectron2's transform_instance_annotations, which keeps integer
# annotation boxes integer (a resize truncates them).
_SAME_BOX_IOU = 0.8


def picture_scale(sizes: Sequence[Sequence[int]], min_side: int = MIN_SIDE) -> int:
    """
    The integer factor that enlarges images of ``sizes`` ((h, w) each) until the longest side is
    at least ``min_side`` pixels (1: no enlargement).
    """
    longest = max(max(int(h), int(w)) for h, w in sizes)
    return max(1, math.ceil(min_side / max(longest, 1)))


def side_by_side(panels: Sequence[np.ndarray], gap: int = PANEL_GAP) -> np.ndarray:
    """
    Panels (ndarray[H_i, W_i, 3] uint8) left to right, top-aligned, ``gap`` white columns apart;
    shorter panels are padded with white below.
    """
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _class_name(metadata, c: int) -> str:
    names = metadata.get("thing_classes", None) if metadata is not None else None
    return names[c] if names is not None and 0 <= c < len(names) else str(c)


def _to_rgb(image: torch.Tensor, image_format: str) -> np.ndarray:
    """ndarray[H, W, 3] uint8 RGB of a mapper's ``Tensor[3, H, W]`` in ``image_format``."""
    rgb = utils.convert_image_to_rgb(image.permute(1, 2, 0), image_format)
    return np.ascontiguousarray(np.asarray(rgb).round().clip(0, 255).astype(np.uint8))


def draw_two_views(
    mapped: Dict,
    *,
    image_format: str,
    pixel_mean: Sequence[float],
    metadata=None,
    pixel_mask: Optional[torch.Tensor] = None,
    sampled: Optional[torch.Tensor] = None,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """
    The views picture of one mapped image (see the module's doc).

    Args:
        mapped: a dict of :class:`TwoViewDatasetMapper` (``view1`` / ``view2`` with ``image``
            Tensor[3, H_v, W_v] uint8 in ``image_format`` and ``instances``; ``view1/targets``
            optional).
        image_format: ``INPUT.FORMAT``.
        pixel_mean: ``MODEL.PIXEL_MEAN`` (in ``image_format``'s channel order): the colour of the
            masked pixels.
        metadata: the training set's metadata (``thing_classes``: class names), or None.
        pixel_mask: BoolTensor[H_1, W_1] (True = masked pixel of view 1), or None.
        sampled: LongTensor[K], the pairs the step drew (rows of the instances), or None (no
            distinction: every pair solid).
        min_side: enlarge the views (one integer factor, :func:`picture_scale`) to this size.

    Returns:
        ndarray[H, W, 3] uint8 RGB: view 1 at (0, 0), view 2 at column
        ``scale * W_1 + PANEL_GAP``.
    """
    views = [mapped["view1"], mapped["view2"]]
    images = [_to_rgb(v["image"], image_format) for v in views]
    scale = picture_scale([im.shape[:2] for im in images], min_side)
    if pixel_mask is not None:
        mean = np.asarray(pixel_mean, dtype=np.float64).reshape(1, 1, -1)
        mean_rgb = np.asarray(utils.convert_image_to_rgb(mean, image_format)).reshape(-1)
        images[0][pixel_mask.cpu().numpy().astype(bool)] = mean_rgb.round().clip(0, 255)
    drawn = set(range(len(views[0]["instances"]))) if sampled is None else set(sampled.tolist())
    panels = []
    for v, (view, image) in enumerate(zip(views, images)):
        vis = Visualizer(image, metadata, scale=scale)
        instances = view["instances"]
        boxes = instances.gt_boxes.tensor.cpu()
        targets = view.get("targets") if v == 0 else None
        if targets is not None and len(targets):
            t_boxes = targets.gt_boxes.tensor.cpu()
            iou = pairwise_iou(Boxes(t_boxes), Boxes(boxes))  # [T, R]
            same = targets.gt_classes.cpu()[:, None] == instances.gt_classes.cpu()[None, :]
            is_pair = ((iou >= _SAME_BOX_IOU) & same).any(dim=1)
            for box, c in zip(t_boxes[~is_pair].tolist(), targets.gt_classes[~is_pair].tolist()):
                vis.draw_box(box, alpha=0.9, edge_color=_TARGET_COLOR, line_style=":")
                _label(vis, box, _class_name(metadata, c), _TARGET_COLOR)
        for i, (box, c) in enumerate(zip(boxes.tolist(), instances.gt_classes.tolist())):
            color = tuple(_PAIR_COLORS[i % len(_PAIR_COLORS)])
            style = "-" if i in drawn else "--"
            vis.draw_box(box, alpha=0.9, edge_color=color, line_style=style)
            _label(vis, box, f"{i} {_class_name(metadata, c)}", color)
        panels.append(vis.output.get_image())
    return side_by_side(panels)


def _label(vis: Visualizer, box, text: str, color) -> None:
    """``text`` at the top left corner of ``box``, inside it (detectron2's style)."""
    vis.draw_text(text, (box[0], box[1]), color=color, horizontal_alignment="left")


def views_pictures(
    model,
    batch: List[Dict],
    iteration: int,
    *,
    image_format: str,
    metadata=None,
    num_images: Optional[int] = None,
    min_side: int = MIN_SIDE,
) -> List[np.ndarray]:
    """
    The views pictures (:func:`draw_two_views`) of the first ``num_images`` (default all) images
    of a training ``batch`` of a :class:`DRCL2` ``model``, with the instances and masked patches
    the model draws for them at ``iteration`` (:meth:`DRCL2.draws` on the whole batch: the
    draws of the training step).
    """
    sampled, masks = model_draws(model, batch, iteration)
    if model.box_source != "gt":
        sampled = [None] * len(batch)  # the draws are rows of the proposals, not of the pairs
    count = len(batch) if num_images is None else min(num_images, len(batch))
    return [
        draw_two_views(
            batch[i],
            image_format=image_format,
            pixel_mean=model.pixel_mean.flatten().tolist(),
            metadata=metadata,
            pixel_mask=masks[i] if masks is not None else None,
            sampled=sampled[i],
            min_side=min_side,
        )
        for i in range(count)
    ]


def draw_predictions(
    image_rgb: np.ndarray,
    predictions,
    metadata=None,
    ground_truth: Optional[Dict] = None,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """
    The predictions picture of one image: the ground truth (a detectron2 dataset dict, drawn
    with ``Visualizer.draw_dataset_dict``) on the left when given, the ``predictions``
    (``Instances`` of a detector's output in image coordinates, already filtered by score) on the
    right, enlarged to ``min_side`` (an integer factor).

    Args:
        image_rgb: ndarray[H, W, 3] uint8 RGB.

    Returns:
        ndarray[H', W', 3] uint8 RGB.
    """
    scale = picture_scale([image_rgb.shape[:2]], min_side)
    panels = []
    if ground_truth is not None:
        panels.append(
            Visualizer(image_rgb, metadata, scale=scale).draw_dataset_dict(ground_truth).get_image()
        )
    vis = Visualizer(image_rgb, metadata, scale=scale)
    panels.append(vis.draw_instance_predictions(predictions.to("cpu")).get_image())
    return side_by_side(panels)
