"""The detector-aligned RPN term (docs/method.md): ``loss_rpn_cls``, ``loss_rpn_loc`` on view 1's
annotated boxes."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import build_proposal_generator
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from torch import nn

from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext

__all__ = ["RPNLossHead", "rpn_losses_only", "RPN_TARGETS"]

RPN_TARGETS = ("view", "pairs")  # MODEL.DRCL2.RPN.TARGETS


@DRCL2_HEAD_REGISTRY.register()
class RPNLossHead(PretextHead):
    """
    detectron2's RPN losses (class-agnostic) on the annotated boxes of view 1, from the online
    features of view 1, so that the RPN arrives pre-trained. Its targets are view 1's own
    (``targets="view"``: every object visible in view 1, ``ctx.targets1``), or, as 2DRCL v1 had it,
    the objects that survive both views (``"pairs"``: an object cut from view 2 is then a
    negative in view 1). With ``proposals`` it also gives the proposals of view 1 (detectron2's
    ``RPN.forward``) to the supervised detection head (``ctx.state["proposals"]``).
    Module: ``proposal_generator`` (exported).
    """

    @configurable
    def __init__(
        self,
        *,
        proposal_generator: nn.Module,
        weight: float = 1.0,
        targets: str = "view",
        proposals: bool = False,
    ):
        """
        Args:
            proposal_generator: a detectron2 ``RPN``.
            weight: w_rpn.
            targets: "view" or "pairs" (see the class doc).
            proposals: also compute view 1's proposals (for :class:`SupervisedDetectionHead`).
        """
        if targets not in RPN_TARGETS:
            raise ValueError(f"RPNLossHead: targets must be one of {RPN_TARGETS}; got {targets!r}.")
        super().__init__(in_features=proposal_generator.in_features)
        self.proposal_generator, self.weight = proposal_generator, weight
        self.targets, self.proposals = targets, proposals

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        return {
            "proposal_generator": build_proposal_generator(cfg, input_shape),
            "weight": d.RPN.WEIGHT,
            "targets": d.RPN.TARGETS,
            "proposals": d.DET.ENABLED,
        }

    def online_modules(self):
        return {"proposal_generator": self.proposal_generator}

    def losses(self, ctx: StepContext, normalizers):
        rpn = ctx.module("proposal_generator")
        if self.targets == "view":
            if ctx.targets1 is None:
                raise ValueError(
                    "DRCL2: MODEL.DRCL2.RPN.TARGETS is 'view' but the inputs carry no view1 "
                    "'targets'; build them with drcl2's TwoViewDatasetMapper (or set RPN.TARGETS "
                    "'pairs')."
                )
            targets = ctx.targets1
        else:
            targets = ctx.instances1
        if self.proposals:
            images = ImageList(ctx.x1, ctx.image_sizes1)
            ctx.state["proposals"], losses = rpn(images, ctx.online1, targets)
        else:
            losses = rpn_losses_only(rpn, ctx.online1, targets)
        # detectron2 averages the RPN losses over this rank's images: rescale to the global
        # per-image mean (see DRCL2's class doc).
        scale = self.weight * comm.get_world_size() * len(ctx.instances1) / sum(ctx.image_counts)
        return {k: scale * v for k, v in losses.items()}


def rpn_losses_only(rpn, features: Dict[str, torch.Tensor], gt_instances: List[Instances]):
    """
    The training losses of detectron2's :class:`RPN` (``loss_rpn_cls``, ``loss_rpn_loc``) without
    its proposals: ``RPN.forward`` minus ``predict_proposals`` (top-k + NMS per image), which
    pre-training never uses. Same modules, anchors, matching, sampling and losses.

    Args:
        rpn: a detectron2 ``RPN``.
        features: level -> Tensor[N, C, H_l, W_l].
        gt_instances: N Instances with ``gt_boxes`` (their ``image_size`` is the view's size).
    """
    features = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features)
    pred_objectness_logits, pred_anchor_deltas = rpn.rpn_head(features)
    pred_objectness_logits = [
        score.permute(0, 2, 3, 1).flatten(1) for score in pred_objectness_logits
    ]
    box_dim = rpn.anchor_generator.box_dim
    pred_anchor_deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
        .permute(0, 3, 4, 1, 2)
        .flatten(1, -2)
        for x in pred_anchor_deltas
    ]
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt_instances)
    return rpn.losses(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)
