"""LCL, local (RoIAlign-based, object-level) contrastive learning (docs/method.md):
``loss_lcl_inst``, ``loss_lcl_sup``."""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_every_n_seconds
from torch import nn

from .blocks import ClassMemory, KeyQueue, MLPHead, box_features, build_key_queue, check_key_queue
from .distributed import all_gather_rows, batch_norm_trains, ddp_normalizer
from .losses import (
    at_least_float32,
    balanced_supervised_contrastive_loss,
    byol_loss,
    info_nce_loss,
    scale_gradient,
)
from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext, check_weights

__all__ = ["LocalContrastiveHead", "LCL_LOSSES"]

LCL_LOSSES = ("byol", "infonce")  # MODEL.DRCL2.LCL.LOSS, the instance term

logger = logging.getLogger(__name__)


@DRCL2_HEAD_REGISTRY.register()
class LocalContrastiveHead(PretextHead):
    """
    L_LCL on the K drawn instances of every image: RoIAlign + box head (the model's ``roi_heads``)
    + projector (+ predictor online) on view 1 online and view 2 target. Two terms:

    * L_inst over all drawn instances: BYOL (``loss="byol"``: 2 - 2 cos to the target embedding of
      the same instance) or InfoNCE (``"infonce"``: the same instance's target embedding against
      those of every instance of the global batch and, with ``queue``, of the last instances
      before it (MoCo), temperature ``inst_temperature``; AlignDet's without the queue);
    * L_sup over the labelled ones (balanced supervised contrastive, class weights
      ``ctx.class_weights["sup"]``) against the target embeddings of the global batch and, with
      ``memory`` (a :class:`ClassMemory`), the last target embeddings of every class, so that an
      instance has positives even when its class appears once in the batch.

    ``backbone_grad`` scales the gradient LCL sends into the backbone and FPN (0: LCL trains only
    the box head and its MLPs on the features the other terms shape; AlignDet's frozen backbone).

    Layers: ``projector``, ``predictor``, ``memory``, ``queue``; target copies: the box head (the
    model's) and ``projector``.
    """

    @configurable
    def __init__(
        self,
        *,
        box_in_features,
        projector: nn.Module,
        predictor: nn.Module,
        temperature: float = 0.2,
        supervised: bool = True,
        sup_weight: float = 0.5,
        weight: float = 1.0,
        symmetric: bool = False,
        loss: str = "byol",
        inst_temperature: float = 0.5,
        memory: ClassMemory = None,
        backbone_grad: float = 1.0,
        queue: KeyQueue = None,
    ):
        """
        Args:
            box_in_features: the levels the model's box pooler reads.
            projector, predictor: the LCL MLPs.
            temperature: tau_l of L_sup.
            supervised: compute L_sup.
            sup_weight: beta.
            weight: w_lcl.
            symmetric: also train the swapped pair (online v2 vs target v1).
            loss: the instance term, one of :data:`LCL_LOSSES`.
            inst_temperature: the InfoNCE temperature of the instance term.
            memory: the per-class memory of target embeddings for L_sup, or None.
            backbone_grad: factor on the gradient into the backbone, in [0, 1].
            queue: the instance term's InfoNCE negatives of earlier steps (``loss="infonce"``
                only), or None.
        """
        if loss not in LCL_LOSSES:
            raise ValueError(f"MODEL.DRCL2.LCL.LOSS = {loss!r}: must be one of {LCL_LOSSES}.")
        if not 0.0 <= backbone_grad <= 1.0:
            raise ValueError(
                f"MODEL.DRCL2.LCL.BACKBONE_GRAD = {backbone_grad}: must lie in [0, 1]."
            )
        check_key_queue("MODEL.DRCL2.LCL", queue, loss)
        for key, value in (("TEMPERATURE", temperature), ("INST_TEMPERATURE", inst_temperature)):
            if not value > 0:
                raise ValueError(f"MODEL.DRCL2.LCL.{key} = {value}: must be > 0.")
        # With no gradient into the backbone LCL reads no level as far as DDP is concerned: the
        # model joins the levels no other head reads with a zero weight.
        super().__init__(
            in_features=box_in_features if backbone_grad > 0 else (),
            target_views=(1, 2) if symmetric else (2,),
            needs_instances=True,
            needs_box_features=True,
        )
        self.box_in_features = list(box_in_features)
        self.projector, self.predictor, self.memory = projector, predictor, memory
        self.queue = queue
        self.temperature, self.supervised, self.sup_weight = temperature, supervised, sup_weight
        self.weight, self.symmetric = weight, symmetric
        self.loss, self.inst_temperature, self.backbone_grad = loss, inst_temperature, backbone_grad

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        check_weights(d.LCL, "MODEL.DRCL2.LCL", "WEIGHT", "SUP_WEIGHT")
        if int(d.LCL.MEMORY_PER_CLASS) != d.LCL.MEMORY_PER_CLASS or d.LCL.MEMORY_PER_CLASS < 0:
            raise ValueError(
                f"MODEL.DRCL2.LCL.MEMORY_PER_CLASS = {d.LCL.MEMORY_PER_CLASS}: must be an integer "
                ">= 0 (0: no memory)."
            )
        # the projector's input size is the model's box head's output size: read it off a box head
        # built aside (fork_rng: without drawing from the random numbers that initialise layers)
        with torch.random.fork_rng(devices=[]):
            box = StandardROIHeads._init_box_head(cfg, input_shape)
        memory = None
        if d.LCL.SUPERVISED and d.LCL.MEMORY_PER_CLASS > 0:
            memory = ClassMemory(
                cfg.MODEL.ROI_HEADS.NUM_CLASSES, d.LCL.MEMORY_PER_CLASS, d.MLP_OUT_DIM
            )
        return {
            "box_in_features": box["box_in_features"],
            "projector": MLPHead(
                box["box_head"].output_shape.channels, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM
            ),
            "predictor": MLPHead(d.MLP_OUT_DIM, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM),
            "temperature": d.LCL.TEMPERATURE,
            "supervised": d.LCL.SUPERVISED,
            "sup_weight": d.LCL.SUP_WEIGHT,
            "weight": d.LCL.WEIGHT,
            "symmetric": d.SYMMETRIC,
            "loss": d.LCL.LOSS,
            "inst_temperature": d.LCL.INST_TEMPERATURE,
            "memory": memory,
            "backbone_grad": d.LCL.BACKBONE_GRAD,
            "queue": build_key_queue("MODEL.DRCL2.LCL.QUEUE_SIZE", d.LCL.QUEUE_SIZE, d.MLP_OUT_DIM),
        }

    def target_modules(self):
        return ("projector",)

    def losses(self, ctx: StepContext, normalizers):
        roi_heads, projector, predictor = ctx.model.roi_heads, self.projector, self.predictor
        target_projector = ctx.target(self, "projector")
        if batch_norm_trains(ctx.instance_counts, projector, predictor, target_projector):
            inst, sup = self._terms(ctx, roi_heads, projector, predictor, target_projector)
            skipped = 0.0
        else:
            # Too few instances for the MLPs' batch norm (the same answer on every rank): a zero
            # loss that still reaches every LCL parameter and level (DDP needs a gradient for each).
            params = [p for m in (roi_heads.box_head, projector, predictor) for p in m.parameters()]
            inst = sum(p.sum() for p in params if p.requires_grad) * 0.0
            sup = inst if self.supervised else None
            ctx.skip(self)
            skipped = 1.0
            log_every_n_seconds(
                logging.WARNING,
                f"LCL skipped this step: {ctx.instance_counts} drawn instance(s) per process are "
                "too few for the batch norm of its MLPs (MODEL.DRCL2.HEAD_NORM); its loss is 0. "
                "Draw more boxes (MODEL.DRCL2.LCL.NUM_INSTANCES, SOLVER.IMS_PER_BATCH) or use a "
                "HEAD_NORM without batch statistics ('GN', 'LN', ''). The scalar "
                "drcl2/lcl_skipped counts such steps.",
                n=60,
                name=__name__,
            )
        try:
            get_event_storage().put_scalar("drcl2/lcl_skipped", skipped, smoothing_hint=False)
        except AssertionError:  # no trainer
            pass
        losses = {"loss_lcl_inst": self.weight * inst}
        if sup is not None:
            losses["loss_lcl_sup"] = self.weight * self.sup_weight * sup
        return losses

    def _terms(self, ctx, roi_heads, projector, predictor, target_projector):
        """
        Returns:
            (L_inst, L_sup or None): scalar Tensors, unweighted. Instances of class -1 (unlabelled
            proposals) are in L_inst only.
        """
        sampled, weights = ctx.sampled, ctx.class_weights["sup"]
        boxes1 = [inst.gt_boxes[idx] for inst, idx in zip(ctx.boxes1, sampled)]
        boxes2 = [inst.gt_boxes[idx] for inst, idx in zip(ctx.boxes2, sampled)]
        classes = torch.cat([inst.gt_classes[idx] for inst, idx in zip(ctx.boxes1, sampled)])
        levels = self.box_in_features

        def online_embed(features, boxes):
            features = {k: scale_gradient(features[k], self.backbone_grad) for k in levels}
            return predictor(projector(box_features(roi_heads, features, boxes)))

        target_head = ctx.target_box_head
        with torch.no_grad():
            if self.symmetric:  # one batched call over both views
                both = {k: torch.cat([ctx.target1[k], ctx.target2[k]]) for k in levels}
                t = target_projector(
                    box_features(roi_heads, both, boxes1 + boxes2, box_head=target_head)
                )
                t1, t2 = t[: len(classes)], t[len(classes) :]
            else:
                t2 = target_projector(
                    box_features(roi_heads, ctx.target2, boxes2, box_head=target_head)
                )
        normalizer = ddp_normalizer(sum(ctx.instance_counts))
        e1 = online_embed(ctx.online1, boxes1)
        e2 = online_embed(ctx.online2, boxes2) if self.symmetric else None

        # The whole payload of the global batch in one gather: class, target embedding of v2
        # (and of v1 when symmetric); class ids are exact in float32 below 2**24.
        payload = [classes[:, None].float(), at_least_float32(t2)]
        payload += [at_least_float32(t1)] if self.symmetric else []
        needs_gather = self.supervised or self.loss == "infonce"
        gathered = (
            all_gather_rows(torch.cat(payload, dim=1), ctx.instance_counts)
            if needs_gather
            else None
        )
        dim = t2.shape[1]

        if self.loss == "byol":
            inst = byol_loss(e1, t2, normalizer)
            if self.symmetric:
                inst = 0.5 * (inst + byol_loss(e2, t1, normalizer))
        else:
            # the keys of the global batch, then the queue's (earlier steps'): positives stand
            keys2, keys1 = gathered[:, 1 : 1 + dim], gathered[:, 1 + dim :]
            if self.queue is not None:
                negatives = self.queue.exchange(keys2)  # queues view 2's keys, on every rank
                keys2 = torch.cat([keys2, negatives])
                keys1 = torch.cat([keys1, negatives]) if self.symmetric else keys1
            offset = sum(ctx.instance_counts[: comm.get_rank()])
            positives = torch.arange(len(e1), device=e1.device) + offset
            inst = info_nce_loss(e1, keys2, positives, self.inst_temperature, normalizer)
            if self.symmetric:
                inst = 0.5 * (
                    inst + info_nce_loss(e2, keys1, positives, self.inst_temperature, normalizer)
                )
        if not self.supervised:
            return inst, None

        all_classes = gathered[:, 0].round().long()
        # L_sup is over labelled instances only (unlabelled proposals have class -1): anchors of
        # this rank and keys of the global batch alike.
        labelled, all_labelled = classes >= 0, all_classes >= 0
        gathered, all_classes = gathered[all_labelled], all_classes[all_labelled]
        if not bool(all_labelled.any()):  # no labelled instance anywhere: a zero reaching e1
            return inst, e1.sum() * 0.0
        # Keys: the global batch's target embeddings, then the memory's (from earlier steps).
        keys1, keys2, key_classes = gathered[:, 1 : 1 + dim], gathered[:, 1 + dim :], all_classes
        if self.memory is not None:
            memory, memory_classes = self.memory.entries()
            keys1 = torch.cat([keys1, memory.to(keys1)])
            keys2 = torch.cat([keys2, memory.to(keys2)]) if self.symmetric else keys2
            key_classes = torch.cat([key_classes, memory_classes.to(key_classes)])
            self.memory.push(gathered[:, 1 : 1 + dim], all_classes)  # the same on every rank
        sup_normalizer = ddp_normalizer(weights[all_classes].sum())
        anchor_classes = classes[labelled]
        instance_weights = weights[anchor_classes]
        sup = balanced_supervised_contrastive_loss(
            e1[labelled],
            anchor_classes,
            instance_weights,
            keys1,
            key_classes,
            self.temperature,
            sup_normalizer,
        )
        if self.symmetric:
            sup = 0.5 * (
                sup
                + balanced_supervised_contrastive_loss(
                    e2[labelled],
                    anchor_classes,
                    instance_weights,
                    keys2,
                    key_classes,
                    self.temperature,
                    sup_normalizer,
                )
            )
        return inst, sup
