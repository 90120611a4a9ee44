"""The training losses of detectron2's RPN without its proposals (pre-training without the
detection losses never uses them)."""

from typing import Dict, List

import torch
from detectron2.structures import Instances

__all__ = ["rpn_losses_only"]


def rpn_losses_only(rpn, features: Dict[str, torch.Tensor], gt_instances: List[Instances]):
    """
    ``loss_rpn_cls`` and ``loss_rpn_loc`` of detectron2's :class:`RPN`: ``RPN.forward`` minus
    ``predict_proposals`` (top-k + NMS per image). Same modules, anchors, matching, sampling and
    losses.

    Args:
        rpn: a detectron2 ``RPN``.
        features: level -> Tensor[N, C, H_l, W_l].
        gt_instances: N Instances with ``gt_boxes`` (their ``image_size`` is the view's size).
    """
    features = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features)
    objectness, deltas = rpn.rpn_head(features)
    objectness = [score.permute(0, 2, 3, 1).flatten(1) for score in objectness]
    box_dim = rpn.anchor_generator.box_dim
    deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
        .permute(0, 3, 4, 1, 2)
        .flatten(1, -2)
        for x in deltas
    ]
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt_instances)
    return rpn.losses(anchors, objectness, gt_labels, deltas, gt_boxes)
