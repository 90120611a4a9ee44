"""
ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020) as a detectron2 meta-architecture,
``MODEL.META_ARCHITECTURE: "ATSS"`` (keys under ``MODEL.ATSS``, anchors from
``MODEL.ANCHOR_GENERATOR``).

What the paper (and its code, sfzhang15/ATSS) fixes, and this module follows:

* one square anchor per location, 8x the level's stride (``ANCHOR_GENERATOR.SIZES`` of the config);
* a RetinaNet-style head: 4 conv-GN-ReLU layers per tower, classification from the class tower,
  box deltas (scaled by a learnable scalar per level) and centerness from the box tower;
* adaptive training sample selection (:func:`atss_match`): per GT box, the ``k = 9`` anchors of each
  level closest to its centre are candidates; those with IoU >= mean + std of the candidates' IoUs
  and their centre inside the box are positives; an anchor claimed by several boxes takes the one
  it overlaps most;
* losses: sigmoid focal loss (alpha 0.25, gamma 2) over the number of positives, GIoU loss on the
  decoded boxes weighted by the centerness targets (over their sum) times 2.0, and a
  binary cross-entropy on centerness over the number of positives;
* inference: per level, the locations with class probability > 0.05, top-1000 of them by
  probability x centerness, score sqrt(probability x centerness); per-class NMS at IoU 0.6.

Boxes are in detectron2's continuous coordinates (no "+1" of maskrcnn-benchmark).
"""

import logging
import math
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_anchor_generator, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import backbone_feature_shapes

__all__ = ["ATSS", "ATSSHead", "atss_match", "centerness_targets"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def atss_match(
    anchors: List[Boxes], gt_boxes: Boxes, topk: int = 9, num_anchors_per_location: int = 1
) -> Tensor:
    """
    Adaptive training sample selection (Algorithm 1 of the ATSS paper) for one image.

    Args:
        anchors: per level, the level's anchors, ``Boxes[R_l]`` (R = sum of R_l).
        gt_boxes: ``Boxes[M]``, the image's ground-truth boxes.
        topk: k, candidates per level and per box, times ``num_anchors_per_location`` (as in the
            paper's code); a level with fewer anchors gives all of them.
        num_anchors_per_location: A, anchors at each location.

    Returns:
        Tensor[R] (int64): for each anchor, the index of the GT box it is a positive of, or -1.
    """
    all_anchors = Boxes.cat(anchors)
    num_anchors, num_gt = len(all_anchors), len(gt_boxes)
    matched = torch.full((num_anchors,), -1, dtype=torch.int64, device=all_anchors.device)
    if num_gt == 0:
        return matched
    ious = pairwise_iou(all_anchors, gt_boxes)  # (R, M)
    anchor_centers = all_anchors.get_centers()  # (R, 2)
    distances = torch.cdist(anchor_centers, gt_boxes.get_centers())  # (R, M)

    # 1. candidates: per level, the k * A anchors whose centres are closest to the box centre
    candidates, start = [], 0
    for level in anchors:
        k = min(topk * num_anchors_per_location, len(level))
        if k > 0:
            _, idx = distances[start : start + len(level)].topk(k, dim=0, largest=False)  # (k, M)
            candidates.append(idx + start)
        start += len(level)
    candidates = torch.cat(candidates, dim=0)  # (C, M)
    gt_index = torch.arange(num_gt, device=ious.device).expand_as(candidates)
    candidate_ious = ious[candidates, gt_index]  # (C, M)

    # 2. per-box IoU threshold: mean + std of its candidates' IoUs (std 0 for a single candidate)
    std = candidate_ious.std(dim=0) if len(candidates) > 1 else torch.zeros_like(candidate_ious[0])
    is_pos = candidate_ious >= (candidate_ious.mean(dim=0) + std)[None]

    # 3. the candidate's centre must lie inside the box (0.01 px margin, as the paper's code)
    centers = anchor_centers[candidates]  # (C, M, 2)
    boxes = gt_boxes.tensor[None].expand(len(candidates), -1, -1)  # (C, M, 4)
    ltrb = torch.stack(
        [
            centers[..., 0] - boxes[..., 0],
            centers[..., 1] - boxes[..., 1],
            boxes[..., 2] - centers[..., 0],
            boxes[..., 3] - centers[..., 1],
        ],
        dim=-1,
    )
    is_pos &= ltrb.min(dim=-1).values > 0.01

    # 4. an anchor that is a positive of several boxes goes to the one with the highest IoU
    pos_ious = torch.full_like(ious, -math.inf)
    pos_ious[candidates[is_pos], gt_index[is_pos]] = candidate_ious[is_pos]
    best_iou, best_gt = pos_ious.max(dim=1)
    matched[best_iou > -math.inf] = best_gt[best_iou > -math.inf]
    return matched


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """
    Centerness of points inside boxes (FCOS, used by ATSS):
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.

    Args:
        points: Tensor[P, 2], (x, y); each inside its box.
        boxes: Tensor[P, 4], (x0, y0, x1, y1).

    Returns:
        Tensor[P] in (0, 1]: 1 at the box centre.
    """
    left_right = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], dim=1)
    top_bottom = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], dim=1)
    return torch.sqrt(
        (left_right.min(dim=1).values / left_right.max(dim=1).values)
        * (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
    )


def _mean_over_workers(value: float) -> float:
    """``value`` averaged over the training processes (itself when there is one)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return value
    t = torch.tensor(
        [value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    return t.item() / world_size


class ATSSHead(RetinaNetHead):
    """
    :class:`RetinaNetHead` (two towers of conv-norm-ReLU, classification and box convs) plus a
    centerness conv on the box tower and a learnable scale per level on the box deltas.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int,
        conv_dims: List[int],
        norm="GN",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            input_shape: shapes of the L input levels (equal channels).
            num_classes: K, foreground classes.
            num_anchors: A, anchors per location.
            conv_dims: output channels of each tower conv (4 convs in ATSS).
            norm: norm of the tower convs (detectron2 ``get_norm`` name; ATSS: "GN").
            prior_prob: initial foreground probability of the classifier (focal-loss prior).
        """
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=num_anchors,
            conv_dims=conv_dims,
            norm=norm,
            prior_prob=prior_prob,
        )
        self.centerness = nn.Conv2d(conv_dims[-1], num_anchors, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(self.centerness.weight, std=0.01)
        nn.init.constant_(self.centerness.bias, 0)
        self.scales = nn.Parameter(
            torch.ones(len(input_shape))
        )  # one per level, as the paper's Scale

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                "ATSS needs the same number of anchors at every level; MODEL.ANCHOR_GENERATOR "
                f"gives {num_anchors}."
            )
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ATSS.NUM_CLASSES,
            "num_anchors": num_anchors[0],
            "conv_dims": [input_shape[0].channels] * cfg.MODEL.ATSS.NUM_CONVS,
            "norm": cfg.MODEL.ATSS.NORM,
            "prior_prob": cfg.MODEL.ATSS.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]):
        """
        Args:
            features: L feature maps, Tensor[N, C, H_l, W_l], high to low resolution.

        Returns:
            logits (list[Tensor[N, A*K, H_l, W_l]]), bbox_reg (list[Tensor[N, A*4, H_l, W_l]]),
            centerness (list[Tensor[N, A, H_l, W_l]]; logits).
        """
        assert len(features) == self._num_features
        logits, bbox_reg, centerness = [], [], []
        for level, feature in enumerate(features):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            box_feature = self.bbox_subnet(feature)
            bbox_reg.append(self.bbox_pred(box_feature) * self.scales[level])
            centerness.append(self.centerness(box_feature))
        return logits, bbox_reg, centerness


@META_ARCH_REGISTRY.register()
class ATSS(DenseDetector):
    """
    ATSS: an anchor-based dense detector trained with adaptive training sample selection
    (see the module docstring for what follows the paper).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        num_classes: int,
        topk: int = 9,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        box_reg_loss_weight: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as :class:`DenseDetector`
                (``head`` returns class logits, box deltas and centerness logits per level).
            anchor_generator: anchors of each level of ``head_in_features``.
            box2box_transform: anchor -> box deltas (ATSS: weights (10, 10, 5, 5)).
            num_classes: K, foreground classes.
            topk: k of the sample selection (candidates per level and box).
            focal_loss_alpha, focal_loss_gamma: of the classification focal loss.
            box_reg_loss_weight: weight of the GIoU loss.
            test_score_thresh: class probability a location needs to be a detection candidate.
            test_topk_candidates: candidates kept per level before NMS.
            test_nms_thresh: IoU of the per-class NMS.
            max_detections_per_image: detections kept per image after NMS.
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        if topk < 1:
            raise ValueError(f"MODEL.ATSS.TOPK must be >= 1, got {topk}.")
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.num_classes = num_classes
        self.topk = topk
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.box_reg_loss_weight = box_reg_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        in_features = list(cfg.MODEL.ATSS.IN_FEATURES)
        feature_shapes = backbone_feature_shapes(
            cfg, backbone, in_features, "MODEL.ATSS.IN_FEATURES"
        )
        return {
            "backbone": backbone,
            "head": ATSSHead(cfg, feature_shapes),
            "head_in_features": in_features,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.ATSS.BBOX_REG_WEIGHTS),
            "num_classes": cfg.MODEL.ATSS.NUM_CLASSES,
            "topk": cfg.MODEL.ATSS.TOPK,
            "focal_loss_alpha": cfg.MODEL.ATSS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.ATSS.FOCAL_LOSS_GAMMA,
            "box_reg_loss_weight": cfg.MODEL.ATSS.REG_LOSS_WEIGHT,
            "test_score_thresh": cfg.MODEL.ATSS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.ATSS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.ATSS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def num_anchors_per_location(self) -> int:
        return self.anchor_generator.num_cell_anchors[0]

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas, pred_centerness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_centerness)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        Args:
            anchors: per level, ``Boxes[R_l]``.
            gt_instances: per image, ``Instances`` with ``gt_boxes`` and ``gt_classes``.

        Returns:
            list[Tensor[R]]: per image, each anchor's class, K (= num_classes) for background.
            list[Tensor[R, 4]]: per image, each anchor's matched GT box (zeros for background).
        """
        labels, matched_boxes = [], []
        for inst in gt_instances:
            matched = atss_match(anchors, inst.gt_boxes, self.topk, self.num_anchors_per_location)
            fg = matched >= 0
            labels_i = torch.full_like(matched, self.num_classes)
            labels_i[fg] = inst.gt_classes[matched[fg]]
            boxes_i = torch.zeros((len(matched), 4), device=matched.device)
            boxes_i[fg] = inst.gt_boxes.tensor[matched[fg]]
            labels.append(labels_i)
            matched_boxes.append(boxes_i)
        return labels, matched_boxes

    def losses(
        self, anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_centerness
    ) -> Dict[str, Tensor]:
        """
        Args:
            anchors: per level, ``Boxes[R_l]``.
            pred_logits: per level, Tensor[N, R_l, K]; pred_deltas: per level, Tensor[N, R_l, 4];
            pred_centerness: per level, Tensor[N, R_l, 1].
            gt_labels, gt_boxes: from :meth:`label_anchors`.

        Returns:
            dict: ``loss_cls``, ``loss_box_reg`` (weighted GIoU), ``loss_centerness``.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = gt_labels != self.num_classes
        num_pos = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        # The paper's normalisers: positives (and centerness targets) averaged over the processes,
        # with no moving average (detectron2's RetinaNet / FCOS use one).
        normalizer = max(_mean_over_workers(float(num_pos)), 1.0)

        targets = F.one_hot(gt_labels, num_classes=self.num_classes + 1)[
            ..., :-1
        ]  # no background column
        logits = cat(pred_logits, dim=1)  # (N, R, K)
        loss_cls = (
            sigmoid_focal_loss_jit(
                logits,
                targets.to(logits.dtype),
                alpha=self.focal_loss_alpha,
                gamma=self.focal_loss_gamma,
                reduction="sum",
            )
            / normalizer
        )

        deltas = cat(pred_deltas, dim=1)  # (N, R, 4)
        centerness = cat(pred_centerness, dim=1).squeeze(2)  # (N, R)
        all_anchors = Boxes.cat(anchors).tensor  # (R, 4)
        anchor_idx = pos_mask.nonzero()[:, 1]
        pos_anchors = all_anchors[anchor_idx]
        pos_gt = torch.stack(gt_boxes)[pos_mask]
        ctr_targets = centerness_targets(Boxes(pos_anchors).get_centers(), pos_gt)
        ctr_sum = _mean_over_workers(ctr_targets.sum().item())
        if num_pos > 0:
            pred_boxes = self.box2box_transform.apply_deltas(deltas[pos_mask], pos_anchors)
            loss_box = (giou_loss(pred_boxes, pos_gt) * ctr_targets).sum() / max(ctr_sum, 1e-6)
            loss_ctr = (
                F.binary_cross_entropy_with_logits(
                    centerness[pos_mask], ctr_targets, reduction="sum"
                )
                / normalizer
            )
        else:  # keep the graph (and DDP's gradient sync) with zero losses
            loss_box = deltas.sum() * 0.0
            loss_ctr = centerness.sum() * 0.0
        return {
            "loss_cls": loss_cls,
            "loss_box_reg": self.box_reg_loss_weight * loss_box,
            "loss_centerness": loss_ctr,
        }

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        pred_logits, pred_deltas, pred_centerness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            results.append(
                self.inference_single_image(
                    anchors,
                    [x[img_idx].sigmoid() for x in pred_logits],
                    [x[img_idx] for x in pred_deltas],
                    [x[img_idx].sigmoid() for x in pred_centerness],
                    image_size,
                )
            )
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        class_probs: List[Tensor],
        deltas: List[Tensor],
        centerness: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """
        Args:
            anchors: per level, ``Boxes[R_l]``.
            class_probs: per level, Tensor[R_l, K], sigmoid probabilities.
            deltas: per level, Tensor[R_l, 4].
            centerness: per level, Tensor[R_l, 1], sigmoid probabilities.
            image_size: (height, width) of the (resized) input.

        Returns:
            Instances with ``pred_boxes``, ``scores`` (sqrt(probability x centerness)),
            ``pred_classes``; at most ``max_detections_per_image``.
        """
        boxes_all, scores_all, classes_all = [], [], []
        for anchors_l, probs_l, deltas_l, ctr_l in zip(anchors, class_probs, deltas, centerness):
            keep = probs_l > self.test_score_thresh  # thresholded before centerness, as the paper
            scores = (probs_l * ctr_l)[keep]
            candidates = keep.nonzero()  # (P, 2): location, class
            scores, order = scores.topk(min(len(scores), self.test_topk_candidates))
            location, classes = candidates[order].unbind(dim=1)
            boxes = self.box2box_transform.apply_deltas(
                deltas_l[location], anchors_l.tensor[location]
            )
            boxes_all.append(boxes)
            scores_all.append(torch.sqrt(scores))
            classes_all.append(classes)
        boxes, scores, classes = cat(boxes_all), cat(scores_all), cat(classes_all)
        keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)[
            : self.max_detections_per_image
        ]
        result = Instances(image_size)
        result.pred_boxes = Boxes(boxes[keep])
        result.scores = scores[keep]
        result.pred_classes = classes[keep]
        return result
