"""
The supervised detection losses inside 2DRCL pre-training (docs/method.md, "Heads and losses",
``DET``): ``loss_cls``, ``loss_box_reg`` (and ``loss_mask`` with ``MODEL.MASK_ON``) of detectron2's
ROI heads on view 1, so that pre-training is what the paper's abstract calls it — self-supervised
and supervised learning combined — with the contrastive and reconstruction terms as auxiliaries.
"""

from detectron2.config import configurable
from detectron2.modeling import build_roi_heads
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.structures import ImageList
from detectron2.utils import comm

from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext

__all__ = ["SupervisedDetectionHead"]


@DRCL2_HEAD_REGISTRY.register()
class SupervisedDetectionHead(PretextHead):
    """
    detectron2's ROI heads (``MODEL.ROI_HEADS.NAME``: box classification and regression, and the
    mask head when ``MODEL.MASK_ON``) trained as in fine-tuning: on the RPN's proposals of view 1
    (the :class:`RPNLossHead` makes them; it must be on) against view 1's own annotated targets
    (``ctx.targets1``), from the online features of the unmasked view 1. Module: ``roi_heads``
    (its ``box_head`` is exported; the LCL head pools its boxes with the same ``box_pooler`` /
    ``box_head``; the box predictor and mask head stay behind, as in supervised pre-training).
    """

    @configurable
    def __init__(self, *, roi_heads: ROIHeads, weight: float = 1.0):
        """
        Args:
            roi_heads: detectron2 ROI heads (e.g. ``StandardROIHeads``).
            weight: w_det, on every loss of the ROI heads.
        """
        levels = list(getattr(roi_heads, "box_in_features", []))
        levels += [f for f in getattr(roi_heads, "mask_in_features", []) or [] if f not in levels]
        super().__init__(in_features=levels)
        self.roi_heads, self.weight = roi_heads, weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "roi_heads": build_roi_heads(cfg, input_shape),
            "weight": cfg.MODEL.DRCL2.DET.WEIGHT,
        }

    def online_modules(self):
        return {"roi_heads": self.roi_heads}

    def losses(self, ctx: StepContext, normalizers):
        if "proposals" not in ctx.state or ctx.targets1 is None:
            raise ValueError(
                "DRCL2: the supervised detection head (MODEL.DRCL2.DET) needs view 1's proposals "
                "(the RPN head, MODEL.DRCL2.RPN.ENABLED) and its targets (drcl2's "
                "TwoViewDatasetMapper)."
            )
        images = ImageList(ctx.x1, ctx.image_sizes1)
        _, losses = ctx.module("roi_heads")(
            images, ctx.online1, ctx.state["proposals"], ctx.targets1
        )
        # detectron2 averages the box losses over this rank's sampled RoIs (a fixed number per
        # image):
        # rescale to the global per-image mean (see DRCL2's class doc). The mask loss is a mean over
        # this rank's foreground RoIs, as in detectron2's own multi-GPU training.
        scale = self.weight * comm.get_world_size() * len(ctx.targets1) / sum(ctx.image_counts)
        return {k: scale * v for k, v in losses.items()}
