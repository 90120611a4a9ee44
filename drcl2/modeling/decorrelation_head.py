"""
DECOR, an anti-collapse regulariser of the FPN (docs/method.md, "Evidence"): ``loss_decor``.

Not part of 2DRCL as the paper states it. The health hook showed HCL and SR collapsing FPN
P4-P6 (their locations' effective rank falls from ~100 to ~10): both regress online features onto
target ones without negatives, which low-rank features make easy. DECOR penalises exactly that
state, the correlation between channels over the feature-map locations, on the online features of
the unmasked view 1 (the features fine-tuning reads).
"""

from typing import Dict, Sequence

import torch
from detectron2.config import configurable

from .losses import decorrelation_loss
from .masking import mask_at_stride
from .pretext_head import (
    DRCL2_HEAD_REGISTRY,
    PretextHead,
    StepContext,
    check_levels,
    check_weights,
)

__all__ = ["FeatureDecorrelationHead"]


@DRCL2_HEAD_REGISTRY.register()
class FeatureDecorrelationHead(PretextHead):
    """
    ``loss_decor = weight x mean over in_features of decorrelation_loss(locations x channels)``,
    over this process's locations inside the images (padding excluded). No modules, no target.
    """

    @configurable
    def __init__(
        self,
        *,
        strides: Dict[str, int],
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        weight: float = 1.0,
    ):
        """
        Args:
            strides: level -> stride of the backbone's outputs.
            in_features: the levels regularised.
            weight: w_decor.
        """
        super().__init__(in_features=in_features)
        self.strides, self.weight = dict(strides), weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2.DECOR
        check_weights(d, "MODEL.DRCL2.DECOR", "WEIGHT")
        check_levels("MODEL.DRCL2.DECOR.IN_FEATURES", d.IN_FEATURES, input_shape)
        return {
            "strides": {k: v.stride for k, v in input_shape.items()},
            "in_features": d.IN_FEATURES,
            "weight": d.WEIGHT,
        }

    def locations(
        self, features: torch.Tensor, valid_pixels: torch.Tensor, stride: int
    ) -> torch.Tensor:
        """
        Tensor[M, C]: the locations of ``features`` (Tensor[N, C, h, w]) whose stride cell holds a
        pixel of the image (``valid_pixels``: BoolTensor[N, H, W]).
        """
        valid = mask_at_stride(valid_pixels, stride, tuple(features.shape[-2:]))  # [N, h, w]
        return features.permute(0, 2, 3, 1)[valid]

    def losses(self, ctx: StepContext, normalizers):
        level_losses = [
            decorrelation_loss(self.locations(ctx.online1[name], ctx.valid, self.strides[name]))
            for name in self.in_features
        ]
        return {"loss_decor": self.weight * torch.stack(level_losses).mean()}
