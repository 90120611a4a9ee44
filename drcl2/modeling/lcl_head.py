"""LCL, local (RoIAlign-based, object-level) contrastive learning (METHOD.md): ``loss_lcl_inst``, ``loss_lcl_sup``."""
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import StandardROIHeads

from .distributed import all_gather_rows, batch_norm_trains, ddp_normalizer
from .heads import BoxFeatureHead, MLPHead
from .losses import at_least_float32, byol_loss
from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext

__all__ = ["LocalContrastiveHead"]


@DRCL2_HEAD_REGISTRY.register()
class LocalContrastiveHead(PretextHead):
    """
    L_LCL on the K drawn instances of every image: RoIAlign + box head + projector (+ predictor
    online) on the (masked) view 1 online and view 2 target; L_inst (BYOL form) over all drawn
    instances, L_sup (balanced supervised contrastive, class weights ``ctx.class_weights["sup"]``)
    over the labelled ones, against the target embeddings of the global batch.
    Modules: ``roi_heads`` (box pooler + box head, exported), ``lcl_projector``, ``lcl_predictor``;
    target copies: ``box_head``, ``lcl_projector``.
    """

    @configurable
    def __init__(
        self,
        *,
        roi_heads: BoxFeatureHead,
        projector: nn.Module,
        predictor: nn.Module,
        temperature: float = 0.2,
        supervised: bool = True,
        sup_weight: float = 0.5,
        weight: float = 1.0,
        symmetric: bool = False,
    ):
        """
        Args:
            roi_heads: RoIAlign + box head (:class:`BoxFeatureHead`).
            projector, predictor: the LCL MLPs.
            temperature: tau_l of L_sup.
            supervised: compute L_sup.
            sup_weight: beta.
            weight: w_lcl.
            symmetric: also train the swapped pair (online v2 vs target v1).
        """
        super().__init__(
            in_features=roi_heads.box_in_features, target_views=(1, 2) if symmetric else (2,), needs_instances=True
        )
        self.roi_heads, self.projector, self.predictor = roi_heads, projector, predictor
        self.temperature, self.supervised, self.sup_weight = temperature, supervised, sup_weight
        self.weight, self.symmetric = weight, symmetric

    @classmethod
    def from_config(cls, cfg, input_shape):
        d = cfg.MODEL.DRCL2
        box = StandardROIHeads._init_box_head(cfg, input_shape)
        roi_heads = BoxFeatureHead(
            box_in_features=box["box_in_features"], box_pooler=box["box_pooler"], box_head=box["box_head"]
        )
        return {
            "roi_heads": roi_heads,
            "projector": MLPHead(roi_heads.box_head.output_shape.channels, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM),
            "predictor": MLPHead(d.MLP_OUT_DIM, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM),
            "temperature": d.LCL.TEMPERATURE,
            "supervised": d.LCL.SUPERVISED,
            "sup_weight": d.LCL.SUP_WEIGHT,
            "weight": d.LCL.WEIGHT,
            "symmetric": d.SYMMETRIC,
        }

    def online_modules(self):
        return {"roi_heads": self.roi_heads, "lcl_projector": self.projector, "lcl_predictor": self.predictor}

    def target_modules(self):
        return {"box_head": "roi_heads.box_head", "lcl_projector": "lcl_projector"}

    def losses(self, ctx: StepContext, normalizers):
        roi_heads, projector, predictor = ctx.module("roi_heads"), ctx.module("lcl_projector"), ctx.module("lcl_predictor")
        target_projector = ctx.target_module("lcl_projector")
        if batch_norm_trains(ctx.instance_counts, projector, predictor, target_projector):
            inst, sup = self._terms(ctx, roi_heads, projector, predictor, target_projector)
        else:
            # Too few instances for the MLPs' batch norm (the same answer on every rank): a zero
            # loss that still reaches every LCL parameter and level (DDP needs a gradient for each).
            params = [p for m in (roi_heads, projector, predictor) for p in m.parameters()]
            inst = sum(p.sum() for p in params if p.requires_grad) * 0.0
            sup = inst if self.supervised else None
            ctx.skip(self)
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
        from . import meta_arch  # L_sup through meta_arch's namespace (see the note there)

        sampled, weights = ctx.sampled, ctx.class_weights["sup"]
        boxes1 = [inst.gt_boxes[idx] for inst, idx in zip(ctx.boxes1, sampled)]
        boxes2 = [inst.gt_boxes[idx] for inst, idx in zip(ctx.boxes2, sampled)]
        classes = torch.cat([inst.gt_classes[idx] for inst, idx in zip(ctx.boxes1, sampled)])

        def online_embed(features, boxes):
            return predictor(projector(roi_heads(features, boxes)))

        target_head = ctx.target_module("box_head")
        with torch.no_grad():
            if self.symmetric:  # one batched call over both views
                both = {k: torch.cat([ctx.target1[k], ctx.target2[k]]) for k in roi_heads.box_in_features}
                t = target_projector(roi_heads(both, boxes1 + boxes2, box_head=target_head))
                t1, t2 = t[: len(classes)], t[len(classes):]
            else:
                t2 = target_projector(roi_heads(ctx.target2, boxes2, box_head=target_head))
        normalizer = ddp_normalizer(sum(ctx.instance_counts))
        e1 = online_embed(ctx.online1, boxes1)
        inst = byol_loss(e1, t2, normalizer)
        if self.symmetric:
            e2 = online_embed(ctx.online2, boxes2)
            inst = 0.5 * (inst + byol_loss(e2, t1, normalizer))
        if not self.supervised:
            return inst, None

        # The whole payload of the global batch in one gather: class, target embedding of v2
        # (and of v1 when symmetric); class ids are exact in float32 below 2**24.
        payload = [classes[:, None].float(), at_least_float32(t2)]
        payload += [at_least_float32(t1)] if self.symmetric else []
        gathered = all_gather_rows(torch.cat(payload, dim=1), ctx.instance_counts)
        dim = t2.shape[1]
        all_classes = gathered[:, 0].round().long()
        # L_sup is over labelled instances only (unlabelled proposals have class -1): anchors of
        # this rank and keys of the global batch alike.
        labelled, all_labelled = classes >= 0, all_classes >= 0
        gathered, all_classes = gathered[all_labelled], all_classes[all_labelled]
        if not bool(all_labelled.any()):  # no labelled instance anywhere: a zero reaching e1
            return inst, e1.sum() * 0.0
        sup_normalizer = ddp_normalizer(weights[all_classes].sum())
        anchor_classes = classes[labelled]
        instance_weights = weights[anchor_classes]
        sup = meta_arch.balanced_supervised_contrastive_loss(
            e1[labelled], anchor_classes, instance_weights, gathered[:, 1 : 1 + dim], all_classes,
            self.temperature, sup_normalizer,
        )
        if self.symmetric:
            sup = 0.5 * (
                sup
                + meta_arch.balanced_supervised_contrastive_loss(
                    e2[labelled], anchor_classes, instance_weights, gathered[:, 1 + dim :], all_classes,
                    self.temperature, sup_normalizer,
                )
            )
        return inst, sup
