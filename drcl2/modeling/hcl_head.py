"""HCL, holistic (image-level) contrastive learning (docs/method.md): ``loss_hcl``."""

import math
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn

from .blocks import KeyQueue, MLPHead, build_key_queue, check_key_queue
from .distributed import all_gather_rows, batch_norm_trains, ddp_normalizer
from .losses import at_least_float32, byol_loss, info_nce_loss
from .pretext_head import (
    DRCL2_HEAD_REGISTRY,
    PretextHead,
    StepContext,
    check_levels,
    check_weights,
    feature_channels,
)

__all__ = ["HolisticContrastiveHead", "HCL_LOSSES", "check_images_per_batch"]

HCL_LOSSES = ("byol", "infonce")


@DRCL2_HEAD_REGISTRY.register()
class HolisticContrastiveHead(PretextHead):
    """
    L_HCL between the online image vector of the (masked) view 1, through projector and predictor,
    and the target image vector of view 2 through the target projector (symmetrised when the model
    is). The image vector is the mean over ``in_features`` of padding-aware global average pooling.
    With ``loss="infonce"`` the negatives are the other images of the global batch and, with
    ``queue``, the target vectors of the last images before it (MoCo).
    Layers: ``projector``, ``predictor``, ``queue``; target copy: ``projector``.
    """

    @configurable
    def __init__(
        self,
        *,
        projector: nn.Module,
        predictor: nn.Module,
        strides: Dict[str, int],
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        loss: str = "byol",
        temperature: float = 0.2,
        weight: float = 1.0,
        symmetric: bool = False,
        queue: Optional[KeyQueue] = None,
    ):
        """
        Args:
            projector, predictor: the HCL MLPs.
            strides: level -> stride of the backbone's outputs.
            in_features: levels averaged into the image vector.
            loss: "byol" or "infonce".
            temperature: InfoNCE temperature.
            weight: w_hcl.
            symmetric: also train the swapped pair (online v2 vs target v1).
            queue: the InfoNCE negatives of earlier steps (``loss="infonce"`` only), or None.
        """
        if loss not in HCL_LOSSES:
            raise ValueError(f"MODEL.DRCL2.HCL.LOSS = {loss!r}: must be one of {HCL_LOSSES}.")
        if not temperature > 0:
            raise ValueError(f"MODEL.DRCL2.HCL.TEMPERATURE = {temperature}: must be > 0.")
        check_key_queue("MODEL.DRCL2.HCL", queue, loss)
        super().__init__(in_features=in_features, target_views=(1, 2) if symmetric else (2,))
        self.projector, self.predictor, self.queue = projector, predictor, queue
        self.strides = dict(strides)
        self.loss, self.temperature, self.weight, self.symmetric = (
            loss,
            temperature,
            weight,
            symmetric,
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        check_weights(d.HCL, "MODEL.DRCL2.HCL", "WEIGHT")
        check_levels("MODEL.DRCL2.HCL.IN_FEATURES", d.HCL.IN_FEATURES, input_shape)
        channels = feature_channels(input_shape)
        projector = MLPHead(channels, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM)
        predictor = MLPHead(d.MLP_OUT_DIM, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM)
        check_images_per_batch(cfg, projector, comm.get_world_size())
        return {
            "projector": projector,
            "predictor": predictor,
            "strides": {k: v.stride for k, v in input_shape.items()},
            "in_features": d.HCL.IN_FEATURES,
            "loss": d.HCL.LOSS,
            "temperature": d.HCL.TEMPERATURE,
            "weight": d.HCL.WEIGHT,
            "symmetric": d.SYMMETRIC,
            "queue": build_key_queue("MODEL.DRCL2.HCL.QUEUE_SIZE", d.HCL.QUEUE_SIZE, d.MLP_OUT_DIM),
        }

    def target_modules(self):
        return ("projector",)

    def image_vector(self, features: Dict[str, torch.Tensor], image_sizes) -> torch.Tensor:
        """
        h: the mean over ``in_features`` of global average pooling over the image (padding
        excluded: a location counts when its stride cell starts inside the image).

        Args:
            features: level -> Tensor[N, C, H_l, W_l].
            image_sizes: N (h, w) of the unpadded images.

        Returns:
            Tensor[N, C], float32 or wider.
        """
        pooled = []
        for name in self.in_features:
            f = at_least_float32(features[name])
            n, _, fh, fw = f.shape
            stride = self.strides[name]
            valid = torch.zeros((n, 1, fh, fw), dtype=f.dtype, device=f.device)
            for i, (h, w) in enumerate(image_sizes):
                valid[i, :, : math.ceil(h / stride), : math.ceil(w / stride)] = 1
            pooled.append((f * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)))
        return torch.stack(pooled).mean(dim=0)

    def losses(self, ctx: StepContext, normalizers):
        projector, predictor = self.projector, self.predictor
        target_projector = ctx.target(self, "projector")
        image_counts = ctx.image_counts
        if not batch_norm_trains(image_counts, projector, predictor, target_projector):
            raise ValueError(
                f"DRCL2: the HCL MLPs' batch norm (MODEL.DRCL2.HEAD_NORM) cannot train on "
                f"{image_counts} image(s) per process. Use more images per batch "
                "(SOLVER.IMS_PER_BATCH; per process: IMS_PER_BATCH / number of processes) or a "
                "HEAD_NORM without batch statistics ('GN', 'LN', '')."
            )
        sizes1, sizes2 = ctx.image_sizes1, ctx.image_sizes2
        z1 = predictor(projector(self.image_vector(ctx.online1, sizes1)))
        with torch.no_grad():
            if self.symmetric:  # one batched call over both views (BN statistics over 2N)
                t = target_projector(
                    torch.cat(
                        [
                            self.image_vector(ctx.target1, sizes1),
                            self.image_vector(ctx.target2, sizes2),
                        ]
                    )
                )
                t1, t2 = t[: len(z1)], t[len(z1) :]
            else:
                t2 = target_projector(self.image_vector(ctx.target2, sizes2))
        if self.symmetric:
            z2 = predictor(projector(self.image_vector(ctx.online2, sizes2)))
        normalizer = ddp_normalizer(sum(image_counts))
        if self.loss == "byol":
            loss = byol_loss(z1, t2, normalizer)
            if self.symmetric:
                loss = 0.5 * (loss + byol_loss(z2, t1, normalizer))
            return {"loss_hcl": self.weight * loss}
        # InfoNCE against the keys of the global batch: one gather (both views' keys if symmetric),
        # then the queue's (earlier steps', after the batch's: the positives' indices stand).
        keys = all_gather_rows(torch.cat([t2, t1], dim=1) if self.symmetric else t2, image_counts)
        dim = t2.shape[1]
        keys2, keys1 = keys[:, :dim], keys[:, dim:]
        if self.queue is not None:
            negatives = self.queue.exchange(keys2)  # queues view 2's keys, the same on every rank
            keys2 = torch.cat([keys2, negatives])
            keys1 = torch.cat([keys1, negatives]) if self.symmetric else keys1
        positives = torch.arange(len(z1), device=z1.device) + sum(image_counts[: comm.get_rank()])
        loss = info_nce_loss(z1, keys2, positives, self.temperature, normalizer)
        if self.symmetric:
            loss = 0.5 * (loss + info_nce_loss(z2, keys1, positives, self.temperature, normalizer))
        return {"loss_hcl": self.weight * loss}


def check_images_per_batch(cfg, hcl_projector: nn.Module, world_size: int) -> None:
    """
    Raise ValueError naming ``SOLVER.IMS_PER_BATCH`` when the per-process batch
    (IMS_PER_BATCH / world size) is too small for the batch norm of the HCL MLPs
    (:func:`batch_norm_trains`), e.g. one image per GPU with a plain ``BN`` head norm.
    """
    total = cfg.SOLVER.IMS_PER_BATCH
    per_process = total // max(world_size, 1)
    if not batch_norm_trains([per_process] * world_size, hcl_projector):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total}: {per_process} image(s) per process "
            f"(IMS_PER_BATCH / {world_size} processes) is too few for the batch norm of the HCL "
            f"MLPs (MODEL.DRCL2.HEAD_NORM = {cfg.MODEL.DRCL2.HEAD_NORM!r}), which needs at least "
            "2 images per batch (per process with 'BN'). Raise SOLVER.IMS_PER_BATCH or use a "
            "HEAD_NORM without batch statistics ('GN', 'LN', '')."
        )
