"""
Dual reconstruction (docs/method.md): AR, appearance reconstruction (``loss_ar``), and SR, semantic
reconstruction (``loss_sr``), both from the online features of the masked view 1.
"""

import math
from typing import Dict, Sequence

import torch
from detectron2.config import configurable

from .blocks import AppearanceDecoder, SemanticPredictors
from .losses import (
    appearance_reconstruction_loss,
    semantic_reconstruction_loss,
    semantic_reconstruction_weights,
)
from .masking import mask_at_stride
from .pretext_head import (
    DRCL2_HEAD_REGISTRY,
    PretextHead,
    StepContext,
    check_levels,
    check_weights,
    feature_channels,
)

__all__ = ["AppearanceReconstructionHead", "SemanticReconstructionHead", "check_ar_level"]


@DRCL2_HEAD_REGISTRY.register()
class AppearanceReconstructionHead(PretextHead):
    """
    L_AR: a light decoder on ``in_feature`` predicts view 1's pixels, ``(image - pixel_mean) /
    ar_pixel_std``; L1 over masked pixels plus ``visible_weight`` x over visible ones (padding
    excluded). Layer: ``decoder``.
    """

    @configurable
    def __init__(
        self,
        *,
        decoder: AppearanceDecoder,
        in_feature: str = "p2",
        visible_weight: float = 0.1,
        weight: float = 1.0,
        pixel_std: Sequence[float] = (57.375, 57.120, 58.395),
    ):
        """
        Args:
            decoder: the AR decoder.
            in_feature: the level it reads.
            visible_weight: weight of visible pixels in L_AR.
            weight: w_ar.
            pixel_std: per-channel scale of the target (ImageNet std by default, whatever
                ``MODEL.PIXEL_STD`` the backbone uses).
        """
        super().__init__(in_features=(in_feature,), masks_input=True)
        self.decoder, self.in_feature = decoder, in_feature
        self.visible_weight, self.weight = visible_weight, weight
        self.pixel_std = torch.tensor(pixel_std).view(-1, 1, 1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        check_weights(d.AR, "MODEL.DRCL2.AR", "WEIGHT", "VISIBLE_WEIGHT")
        if d.AR.IN_FEATURE not in input_shape:
            raise ValueError(
                f"MODEL.DRCL2.AR.IN_FEATURE = {d.AR.IN_FEATURE!r}: must name a backbone output "
                f"among {sorted(input_shape)}."
            )
        return {
            "decoder": AppearanceDecoder(
                feature_channels(input_shape), d.AR.HIDDEN_DIM, input_shape[d.AR.IN_FEATURE].stride
            ),
            "in_feature": d.AR.IN_FEATURE,
            "visible_weight": d.AR.VISIBLE_WEIGHT,
            "weight": d.AR.WEIGHT,
            "pixel_std": d.AR.PIXEL_STD,
        }

    def check(self, strides, size_divisibility):
        check_ar_level(self.in_feature, strides, size_divisibility)

    def counts(self, ctx: StepContext):
        return [ctx.masked.sum(), (ctx.valid & ~ctx.masked).sum()]

    def losses(self, ctx: StepContext, normalizers):
        x1 = ctx.x1
        prediction = self.decoder(ctx.online_masked[self.in_feature])
        if prediction.shape[-2:] != x1.shape[-2:]:
            raise ValueError(
                f"DRCL2: the AR decoder predicts {tuple(prediction.shape[-2:])} pixels for a "
                f"{tuple(x1.shape[-2:])} input; MODEL.DRCL2.AR.IN_FEATURE must be a level whose "
                "stride divides the backbone's size_divisibility."
            )
        target = x1 * (
            ctx.model.pixel_std / self.pixel_std.to(x1.device)
        )  # padding stays 0 (ignored)
        loss = appearance_reconstruction_loss(
            prediction,
            target,
            ctx.masked,
            ctx.valid,
            self.visible_weight,
            normalizers=(normalizers[0], normalizers[1]),
        )
        return {"loss_ar": self.weight * loss}


@DRCL2_HEAD_REGISTRY.register()
class SemanticReconstructionHead(PretextHead):
    """
    L_SR: per level of ``predictors.in_features``, a predictor maps the online features of the
    masked view 1 to the target features of the unmasked view 1; 1 - cos per location, masked
    locations weighted 1, visible ``visible_weight``; the mean over levels. Layer: ``predictors``.
    """

    @configurable
    def __init__(
        self,
        *,
        predictors: SemanticPredictors,
        strides: Dict[str, int],
        visible_weight: float = 0.1,
        weight: float = 1.0,
    ):
        """
        Args:
            predictors: the SR predictors (one per level).
            strides: level -> stride of the backbone's outputs.
            visible_weight: weight of visible locations.
            weight: w_sr.
        """
        super().__init__(in_features=predictors.in_features, target_views=(1,), masks_input=True)
        self.predictors, self.strides = predictors, dict(strides)
        self.visible_weight, self.weight = visible_weight, weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        check_weights(d.SR, "MODEL.DRCL2.SR", "WEIGHT", "VISIBLE_WEIGHT")
        check_levels("MODEL.DRCL2.SR.IN_FEATURES", d.SR.IN_FEATURES, input_shape)
        return {
            "predictors": SemanticPredictors(
                d.SR.IN_FEATURES, feature_channels(input_shape), d.SR.HIDDEN_DIM, d.HEAD_NORM
            ),
            "strides": {k: v.stride for k, v in input_shape.items()},
            "visible_weight": d.SR.VISIBLE_WEIGHT,
            "weight": d.SR.WEIGHT,
        }

    def counts(self, ctx: StepContext):
        """The weight sum of every level; its (masked, valid) location masks kept for
        :meth:`losses`."""
        masks, sums = {}, []
        H, W = ctx.padded_size
        for name in self.in_features:
            stride = self.strides[name]
            size = (math.ceil(H / stride), math.ceil(W / stride))
            masks[name] = (
                mask_at_stride(ctx.masked, stride, size),
                mask_at_stride(ctx.valid, stride, size),
            )
            sums.append(semantic_reconstruction_weights(*masks[name], self.visible_weight).sum())
        ctx.scratch[self.key] = masks
        return sums

    def losses(self, ctx: StepContext, normalizers):
        masks = ctx.scratch[self.key]
        predictions = self.predictors(ctx.online_masked)
        level_losses = []
        for (name, prediction), normalizer in zip(predictions.items(), normalizers):
            level_masked, level_valid = masks[name]
            if prediction.shape[-2:] != level_masked.shape[-2:]:
                raise ValueError(
                    f"DRCL2: SR level {name!r} has size {tuple(prediction.shape[-2:])}, "
                    f"expected {tuple(level_masked.shape[-2:])} (padded input / stride "
                    f"{self.strides[name]}); check MODEL.DRCL2.SR.IN_FEATURES."
                )
            level_losses.append(
                semantic_reconstruction_loss(
                    prediction,
                    ctx.target1[name],
                    level_masked,
                    level_valid,
                    self.visible_weight,
                    normalizer=normalizer,
                )
            )
        return {"loss_sr": self.weight * torch.stack(level_losses).mean()}


def check_ar_level(ar_in_feature: str, strides: Dict[str, int], size_divisibility: int) -> None:
    """
    Raise ValueError when the AR decoder cannot predict the padded image from ``ar_in_feature``:
    it upsamples by the level's stride, which must divide the padding multiple of the backbone
    (``size_divisibility``) so that the level holds exactly (padded size / stride) locations.
    """
    if ar_in_feature not in strides:
        raise ValueError(
            f"MODEL.DRCL2.AR.IN_FEATURE = {ar_in_feature!r}: must name a backbone output among "
            f"{sorted(strides)}."
        )
    stride = strides[ar_in_feature]
    if size_divisibility < stride or size_divisibility % stride:
        ok = sorted(
            f for f, s in strides.items() if size_divisibility >= s and size_divisibility % s == 0
        )
        raise ValueError(
            f"MODEL.DRCL2.AR.IN_FEATURE = {ar_in_feature!r}: its stride ({stride}) does not divide "
            f"the backbone's padding multiple (size_divisibility {size_divisibility}), so the "
            f"decoder's x{stride} upsampling would not match the image. Use one of {ok}."
        )
