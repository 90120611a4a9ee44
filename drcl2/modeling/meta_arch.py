"""
The 2DRCL pre-training meta-architecture (METHOD.md): ``MODEL.META_ARCHITECTURE: "DRCL2"``.
"""
import math
import zlib
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_proposal_generator
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.rebalance import RebalanceSchedule, class_weights, instance_class_weights, sample_instances
from .distributed import all_gather_counts, all_gather_rows, batch_norm_trains, ddp_normalizer
from .ema import cosine_momentum, make_target, momentum_update
from .heads import AppearanceDecoder, BoxFeatureHead, MLPHead, SemanticPredictors
from .losses import (
    appearance_reconstruction_loss,
    at_least_float32,
    balanced_supervised_contrastive_loss,
    byol_loss,
    info_nce_loss,
    semantic_reconstruction_loss,
    semantic_reconstruction_weights,
)
from .masking import box_guided_patch_mask, mask_at_stride, patch_mask_to_pixels

__all__ = ["DRCL2", "check_drcl2_config"]

HCL_LOSSES = ("byol", "infonce")
BOX_SOURCES = ("gt", "proposals")  # MODEL.DRCL2.LCL.BOX_SOURCE
DRB_TERMS = ("instances", "sup", "masking")  # where the class weights w_c(lambda) act in the model


@META_ARCH_REGISTRY.register()
class DRCL2(nn.Module):
    """
    2DRCL pre-training: holistic (HCL) and local (LCL) contrastive learning against an EMA target
    network, dual reconstruction (AR, SR) from a box-guided masked view, the RPN loss, and dynamic
    rebalancing (DRB) of instance selection. Each part is optional (``None`` / disabled).

    Online modules carry the names of detectron2's ``GeneralizedRCNN`` (``backbone``,
    ``proposal_generator``, ``roi_heads.box_pooler``, ``roi_heads.box_head``) so their weights
    fine-tune in a stock detectron2 detector (see :func:`drcl2.checkpoint.export_finetune_weights`).
    The target network lives under ``target_network.*``.

    Input: a list of dicts from :class:`drcl2.data.TwoViewDatasetMapper`, each with ``"view1"`` and
    ``"view2"`` = ``{"image": Tensor[3, H, W], "instances": Instances(gt_boxes, gt_classes, ...)}``,
    instances row-aligned across the views, and the dataset's ``"image_id"``; with
    ``lcl_box_source="proposals"`` each view also holds ``"proposals"`` = ``Instances(proposal_boxes,
    gt_classes)`` (class -1: unlabelled), LCL's and box-guided masking's boxes. Output (training
    only): a dict of losses with one key per enabled term: ``loss_hcl``, ``loss_lcl_inst``,
    ``loss_lcl_sup``, ``loss_ar``, ``loss_sr``, ``loss_rpn_cls``, ``loss_rpn_loc``.

    Any trainer can drive it; the model keeps its own state:

    * Target network: at the first training forward of a new iteration the model applies the EMA
      step of the previous iteration (whose optimizer step has happened since), with the momentum
      of that iteration. The iteration is the :class:`EventStorage`'s when there is one, else an
      internal counter (each training forward is then a new iteration). Two buffers record this,
      ``last_iteration`` and ``target_update_pending``, so a checkpoint written after iteration k
      holds the target after step k - 1 and the pending step k, which the first forward after
      resuming applies with the checkpoint's online weights: the resumed run is exact.
      :meth:`update_target` applies the pending step at once (to inspect a final target).
    * Class statistics: with DRB on, hand the training set over once with
      :meth:`set_class_statistics` before training (drcl2's Trainer does); a training forward
      without them raises. They are buffers, saved with checkpoints.
    * Random draws (instances for LCL, masked patches): each image draws from its own generator,
      seeded by ``(seed, iteration, image_id)``, so the draws do not depend on how the batch is
      split over processes, and a resumed run repeats them.

    Multi-process (DDP): every loss is the mean over the global batch (all ranks' images,
    instances and pixels). The counts are exchanged once per step; a rank returns
    ``W * (its part of the global sum) / (global count)`` for each term (W processes), so the
    average over ranks -- what DDP does to the gradients and detectron2's trainer to the logged
    loss values -- equals the loss and gradient of one process on the concatenated batch. Target
    embeddings (LCL payload, InfoNCE keys) are all-gathered as tensors without gradient
    (:mod:`drcl2.modeling.distributed`). Every trainable parameter receives a gradient at every
    step, whatever parts are on and however few instances the global batch holds (DDP runs with
    ``find_unused_parameters=False``); the MLP / SR norms default to ``naiveSyncBN_N``, whose
    statistics are those of the global batch. Mixed precision: image pooling, norms and every loss
    are computed in float32 (or wider: a float64 model stays float64).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_classes: int,
        max_iter: int,
        base_momentum: float = 0.99,
        symmetric: bool = False,
        proposal_generator: Optional[nn.Module] = None,
        rpn_weight: float = 1.0,
        hcl_projector: Optional[nn.Module] = None,
        hcl_predictor: Optional[nn.Module] = None,
        hcl_in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        hcl_loss: str = "byol",
        hcl_temperature: float = 0.2,
        hcl_weight: float = 1.0,
        roi_heads: Optional[BoxFeatureHead] = None,
        lcl_projector: Optional[nn.Module] = None,
        lcl_predictor: Optional[nn.Module] = None,
        lcl_num_instances: int = 8,
        lcl_temperature: float = 0.2,
        lcl_supervised: bool = True,
        lcl_sup_weight: float = 0.5,
        lcl_weight: float = 1.0,
        lcl_box_source: str = "gt",
        rebalance_schedule: Optional[RebalanceSchedule] = None,
        drb_apply_to: Sequence[str] = DRB_TERMS,
        repeat_thresh: float = 0.001,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.5,
        mask_box_guided: float = 0.5,
        ar_decoder: Optional[AppearanceDecoder] = None,
        ar_in_feature: str = "p2",
        ar_visible_weight: float = 0.1,
        ar_weight: float = 1.0,
        ar_pixel_std: Sequence[float] = (57.375, 57.120, 58.395),
        sr_predictors: Optional[SemanticPredictors] = None,
        sr_visible_weight: float = 0.1,
        sr_weight: float = 1.0,
        seed: Optional[int] = None,
    ):
        """
        Args:
            backbone: a detectron2 backbone (ResNet-FPN), the online encoder.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            num_classes: C, the number of classes of the training set.
            max_iter: K, the length of the schedule (momentum and DRB progress).
            base_momentum: m0 of the cosine momentum schedule.
            symmetric: also train the swapped pair (online x2 vs target x1) in HCL and LCL.
            proposal_generator: detectron2's RPN (RPN loss on v1's boxes), or None.
            rpn_weight: w_rpn.
            hcl_projector, hcl_predictor: HCL MLPs (both or neither); None disables HCL.
            hcl_in_features: levels averaged into the image vector.
            hcl_loss: "byol" or "infonce".
            hcl_temperature: InfoNCE temperature.
            hcl_weight: w_hcl.
            roi_heads: RoIAlign + box head (:class:`BoxFeatureHead`); None disables LCL.
            lcl_projector, lcl_predictor: LCL MLPs (with ``roi_heads``).
            lcl_num_instances: K instances per image.
            lcl_temperature: tau_l.
            lcl_supervised: compute the balanced supervised-contrastive term.
            lcl_sup_weight: beta.
            lcl_weight: w_lcl.
            lcl_box_source: where LCL's (and box-guided masking's) boxes come from: "gt" (the
                views' annotated ``instances``) or "proposals" (the views' ``proposals``; an
                unlabelled one, class -1, weighs 1 in the draws and masking and is left out of
                L_sup). The RPN term always uses the annotated boxes.
            rebalance_schedule: lambda(progress) of DRB; None disables DRB (uniform class weights).
            drb_apply_to: where the class weights w_c(lambda) act inside the model, among
                ``DRB_TERMS``: "instances" (which K instances LCL draws), "sup" (the L_sup weights),
                "masking" (where box-guided masking puts its patches); elsewhere weights are 1.
            repeat_thresh: t of the class repeat factors (``DATALOADER.DRCL2.REPEAT_THRESHOLD``).
            mask_patch_size, mask_ratio, mask_box_guided: patch masking of x1 (used with AR or SR).
            ar_decoder: the AR decoder, or None.
            ar_in_feature: the level the AR decoder reads.
            ar_visible_weight: weight of visible pixels in L_AR.
            ar_weight: w_ar.
            ar_pixel_std: per-channel scale of the AR target, ``(image - pixel_mean) / ar_pixel_std``
                (ImageNet std by default, whatever ``pixel_std`` the backbone uses).
            sr_predictors: the SR predictors, or None.
            sr_visible_weight: weight of visible locations in L_SR.
            sr_weight: w_sr.
            seed: base seed of the per-image random draws (instances, masked patches); None: a
                seed drawn from torch's generator when the model is built.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.hcl_projector = hcl_projector
        self.hcl_predictor = hcl_predictor
        self.lcl_projector = lcl_projector
        self.lcl_predictor = lcl_predictor
        self.ar_decoder = ar_decoder
        self.sr_predictors = sr_predictors
        if (hcl_projector is None) != (hcl_predictor is None):
            raise ValueError("DRCL2: give both HCL MLPs (hcl_projector, hcl_predictor) or neither.")
        if (roi_heads is None) != (lcl_projector is None) or (roi_heads is None) != (lcl_predictor is None):
            raise ValueError("DRCL2: give roi_heads, lcl_projector and lcl_predictor together or none.")
        if lcl_box_source not in BOX_SOURCES:
            raise ValueError(f"DRCL2: lcl_box_source must be one of {BOX_SOURCES}; got {lcl_box_source!r}.")
        if hcl_loss not in HCL_LOSSES:
            raise ValueError(f"DRCL2: hcl_loss must be one of {HCL_LOSSES}; got {hcl_loss!r}.")
        # Strides of the levels, from the backbone (never inferred from feature sizes: a level whose
        # stride exceeds the padding multiple, e.g. p6, has ceil-rounded sizes).
        self._strides = {name: shape.stride for name, shape in backbone.output_shape().items()}
        if ar_decoder is not None:
            check_ar_level(ar_in_feature, self._strides, backbone.size_divisibility)

        self.num_classes = num_classes
        self.max_iter = max_iter
        self.base_momentum = base_momentum
        self.symmetric = symmetric
        self.rpn_weight = rpn_weight
        self.hcl_in_features = list(hcl_in_features)
        self.hcl_loss = hcl_loss
        self.hcl_temperature = hcl_temperature
        self.hcl_weight = hcl_weight
        self.lcl_num_instances = lcl_num_instances
        self.lcl_temperature = lcl_temperature
        self.lcl_supervised = lcl_supervised
        self.lcl_sup_weight = lcl_sup_weight
        self.lcl_weight = lcl_weight
        self.lcl_box_source = lcl_box_source
        self.rebalance_schedule = rebalance_schedule
        if not set(drb_apply_to) <= set(DRB_TERMS):
            raise ValueError(f"DRCL2: drb_apply_to must be among {DRB_TERMS}; got {tuple(drb_apply_to)}.")
        self.drb_apply_to = tuple(drb_apply_to)
        self.repeat_thresh = repeat_thresh
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.mask_box_guided = mask_box_guided
        self.ar_in_feature = ar_in_feature
        self.ar_visible_weight = ar_visible_weight
        self.ar_weight = ar_weight
        self.sr_visible_weight = sr_visible_weight
        self.sr_weight = sr_weight
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)

        # Target network: EMA copies of the online modules that have a target counterpart.
        target = {}
        if self.hcl_enabled or self.lcl_enabled or self.sr_enabled:
            target["backbone"] = make_target(backbone)
        if self.hcl_enabled:
            target["hcl_projector"] = make_target(hcl_projector)
        if self.lcl_enabled:
            target["box_head"] = make_target(roi_heads.box_head)
            target["lcl_projector"] = make_target(lcl_projector)
        self.target_network = nn.ModuleDict(target)

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("ar_pixel_std", torch.tensor(ar_pixel_std).view(-1, 1, 1), False)
        # r_c^ins of the training set (w_c(lambda) = r_c^ins ** lambda); 1 until handed over.
        self.register_buffer("class_repeat_factors", torch.ones(num_classes))
        self.register_buffer("class_statistics_set", torch.tensor(False))
        # False until the target network was copied from the (possibly freshly loaded) online one.
        self.register_buffer("target_initialized", torch.tensor(False))
        # The iteration of the last training forward, and whether its EMA step is still to be
        # applied (at the next new iteration): the model's own target-update schedule.
        self.register_buffer("last_iteration", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("target_update_pending", torch.tensor(False))

        # FPN levels the enabled parts read. Levels no part reads, and the levels only LCL reads
        # when LCL skips a step (too few instances), join the graph with a zero weight so that DDP
        # (find_unused_parameters=False) sees a gradient for every backbone parameter.
        read_by_others = set()
        if self.hcl_enabled:
            read_by_others |= set(self.hcl_in_features)
        if self.ar_enabled:
            read_by_others.add(ar_in_feature)
        if self.sr_enabled:
            read_by_others |= set(sr_predictors.in_features)
        if proposal_generator is not None:
            read_by_others |= set(proposal_generator.in_features)
        lcl_levels = set(roi_heads.box_in_features) if self.lcl_enabled else set()
        self._unused_levels = [f for f in self._strides if f not in read_by_others | lcl_levels]
        self._lcl_only_levels = [f for f in self._strides if f in lcl_levels - read_by_others]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg):
        check_drcl2_config(cfg)
        d = cfg.MODEL.DRCL2
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        check_feature_levels(cfg, shapes)
        channels = {shapes[f].channels for f in shapes}
        if len(channels) != 1:
            raise ValueError(f"DRCL2 needs one channel count on all backbone outputs; got {channels}.")
        channels = channels.pop()
        mlp = lambda in_dim: MLPHead(in_dim, d.MLP_HIDDEN_DIM, d.MLP_OUT_DIM, d.HEAD_NORM)  # noqa

        ret = {
            "backbone": backbone,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "base_momentum": d.BASE_MOMENTUM,
            "symmetric": d.SYMMETRIC,
            "repeat_thresh": cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD,
            "mask_patch_size": d.MASK.PATCH_SIZE,
            "mask_ratio": d.MASK.RATIO,
            "mask_box_guided": d.MASK.BOX_GUIDED,
            "lcl_box_source": d.LCL.BOX_SOURCE,
            "seed": cfg.SEED if cfg.SEED >= 0 else None,
        }
        if d.RPN.ENABLED:
            ret["proposal_generator"] = build_proposal_generator(cfg, shapes)
            ret["rpn_weight"] = d.RPN.WEIGHT
        if d.HCL.ENABLED:
            ret.update(
                hcl_projector=mlp(channels),
                hcl_predictor=mlp(d.MLP_OUT_DIM),
                hcl_in_features=d.HCL.IN_FEATURES,
                hcl_loss=d.HCL.LOSS,
                hcl_temperature=d.HCL.TEMPERATURE,
                hcl_weight=d.HCL.WEIGHT,
            )
            check_images_per_batch(cfg, ret["hcl_projector"], comm.get_world_size())
        if d.LCL.ENABLED:
            box = StandardROIHeads._init_box_head(cfg, shapes)
            roi_heads = BoxFeatureHead(
                box_in_features=box["box_in_features"],
                box_pooler=box["box_pooler"],
                box_head=box["box_head"],
            )
            ret.update(
                roi_heads=roi_heads,
                lcl_projector=mlp(roi_heads.box_head.output_shape.channels),
                lcl_predictor=mlp(d.MLP_OUT_DIM),
                lcl_num_instances=d.LCL.NUM_INSTANCES,
                lcl_temperature=d.LCL.TEMPERATURE,
                lcl_supervised=d.LCL.SUPERVISED,
                lcl_sup_weight=d.LCL.SUP_WEIGHT,
                lcl_weight=d.LCL.WEIGHT,
            )
        if d.DRB.ENABLED:
            s = cfg.DATALOADER.DRCL2
            ret["rebalance_schedule"] = RebalanceSchedule(s.START, s.END, s.MODE)
            ret["drb_apply_to"] = tuple(d.DRB.APPLY_TO)
        if d.AR.ENABLED:
            ret.update(
                ar_decoder=AppearanceDecoder(channels, d.AR.HIDDEN_DIM, shapes[d.AR.IN_FEATURE].stride),
                ar_in_feature=d.AR.IN_FEATURE,
                ar_visible_weight=d.AR.VISIBLE_WEIGHT,
                ar_pixel_std=d.AR.PIXEL_STD,
                ar_weight=d.AR.WEIGHT,
            )
        if d.SR.ENABLED:
            ret.update(
                sr_predictors=SemanticPredictors(d.SR.IN_FEATURES, channels, d.SR.HIDDEN_DIM, d.HEAD_NORM),
                sr_visible_weight=d.SR.VISIBLE_WEIGHT,
                sr_weight=d.SR.WEIGHT,
            )
        return ret

    # ------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def hcl_enabled(self) -> bool:
        return self.hcl_projector is not None

    @property
    def lcl_enabled(self) -> bool:
        return self.roi_heads is not None

    @property
    def ar_enabled(self) -> bool:
        return self.ar_decoder is not None

    @property
    def sr_enabled(self) -> bool:
        return self.sr_predictors is not None

    @property
    def masking_enabled(self) -> bool:
        """Dual reconstruction (AR or SR) makes the online network see the masked view."""
        return (self.ar_enabled or self.sr_enabled) and self.mask_ratio > 0

    def online_target_pairs(self) -> Dict[str, nn.Module]:
        """Name in ``target_network`` -> the online module it follows."""
        online = {
            "backbone": self.backbone,
            "hcl_projector": self.hcl_projector,
            "box_head": self.roi_heads.box_head if self.roi_heads is not None else None,
            "lcl_projector": self.lcl_projector,
        }
        return {name: online[name] for name in self.target_network}

    @torch.no_grad()
    def reset_target(self) -> None:
        """Copy the online weights into the target network (start of training)."""
        for name, online in self.online_target_pairs().items():
            momentum_update(online, self.target_network[name], 0.0)
        self.target_initialized.fill_(True)
        self.target_update_pending.fill_(False)

    @torch.no_grad()
    def update_target(self) -> Optional[float]:
        """
        Apply the pending EMA step now: the step of the last training iteration,
        ``xi <- m xi + (1 - m) theta`` with ``m = cosine_momentum(m0, last_iteration, max_iter)``.
        Training needs no call (the next new iteration's forward applies it); call it to inspect or
        keep the target after the final iteration. Calling it twice applies the step once.

        Returns:
            the momentum m used, or None when no step was pending.
        """
        if not bool(self.target_update_pending):
            return None
        m = cosine_momentum(self.base_momentum, int(self.last_iteration), self.max_iter)
        for name, online in self.online_target_pairs().items():
            momentum_update(online, self.target_network[name], m)
        self.target_update_pending.fill_(False)
        return m

    def _start_iteration(self, iteration: int) -> None:
        """
        Bring the target network up to date at the start of a training forward of ``iteration``:
        copy it from the online network the first time, else apply the EMA step of the previous
        iteration when ``iteration`` is a new one (a second forward in the same iteration, e.g.
        gradient accumulation, changes nothing).
        """
        if not bool(self.target_initialized):
            self.reset_target()
        elif iteration != int(self.last_iteration):
            self.update_target()
        self.last_iteration.fill_(iteration)
        self.target_update_pending.fill_(True)

    @torch.no_grad()
    def set_class_statistics(self, dataset_dicts: List[dict]) -> None:
        """
        Hand the training set to the model: stores r_c^ins (``class_weights(..., lam=1)``), from
        which the class weights ``w_c(lambda) = (r_c^ins) ** lambda`` follow at every step.

        Args:
            dataset_dicts: detectron2 dataset dicts of the training set (contiguous category ids
                in ``[0, MODEL.ROI_HEADS.NUM_CLASSES)``).
        """
        try:
            factors = class_weights(dataset_dicts, self.repeat_thresh, 1.0, self.num_classes)
        except ValueError as e:
            raise ValueError(
                f"DRCL2 class statistics of the training set: {e} Check that "
                f"MODEL.ROI_HEADS.NUM_CLASSES ({self.num_classes}) matches DATASETS.TRAIN."
            ) from e
        self.class_repeat_factors.copy_(factors.to(self.class_repeat_factors))
        self.class_statistics_set.fill_(True)

    def class_weights_at(self, lam: float) -> torch.Tensor:
        """w_c(lambda) = (r_c^ins) ** lambda, Tensor[C]."""
        return self.class_repeat_factors.float() ** lam

    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: a list of N dicts from :class:`TwoViewDatasetMapper`.

        Returns:
            dict[str, Tensor]: the weighted losses, one key per enabled term; with several
            processes, this rank's share as the class doc describes (their average over ranks is
            the loss of the global batch).
        """
        if not self.training:
            raise RuntimeError(
                "DRCL2 is a pre-training model and has no inference; export its weights with "
                "`python -m drcl2.tools.export_weights` and fine-tune / evaluate a GeneralizedRCNN."
            )
        if self.rebalance_schedule is not None and not bool(self.class_statistics_set):
            raise RuntimeError(
                "DRCL2: dynamic rebalancing is on (MODEL.DRCL2.DRB.ENABLED) but the model has no "
                "class statistics of the training set. Hand them over once before training with "
                "model.set_class_statistics(dataset_dicts), dataset_dicts being the training set's "
                "dicts (e.g. detectron2.data.get_detection_dataset_dicts(cfg.DATASETS.TRAIN)); "
                "drcl2.engine.Trainer does this itself."
            )
        try:
            storage = get_event_storage()
            iteration = storage.iter
        except AssertionError:  # no trainer: each training forward is a new iteration
            storage, iteration = None, int(self.last_iteration) + 1
        with record_function("drcl2.ema"):
            self._start_iteration(iteration)
        lam = 0.0
        if self.rebalance_schedule is not None:
            lam = self.rebalance_schedule.lam(iteration / max(self.max_iter, 1))
        weights = self.class_weights_at(lam)  # [C]
        # DRB.APPLY_TO: the terms that take w_c(lambda); the others weigh every class 1
        term_weights = {t: weights if t in self.drb_apply_to else torch.ones_like(weights) for t in DRB_TERMS}
        if storage is not None:
            storage.put_scalar("drcl2/lambda", lam, smoothing_hint=False)
            # the momentum of this iteration's EMA step (applied at the start of the next one)
            momentum = cosine_momentum(self.base_momentum, iteration, self.max_iter)
            storage.put_scalar("drcl2/momentum", momentum, smoothing_hint=False)

        images, instances1, instances2 = self.preprocess(batched_inputs)
        boxes1, boxes2 = self._lcl_instances(batched_inputs, instances1, instances2)
        N = len(batched_inputs)
        image_sizes = images.image_sizes
        padded_size = tuple(images.tensor.shape[-2:])
        x1, x2 = images.tensor[:N], images.tensor[N:]

        with record_function("drcl2.masking"):
            sampled, pixel_mask = self._draw(
                batched_inputs, term_weights["instances"], term_weights["masking"], image_sizes[:N], padded_size,
                iteration, lcl_instances=boxes1,
            )
            online_input = x1
            if pixel_mask is not None:
                online_input = x1 * (~pixel_mask)[:, None].to(x1.dtype)
            # Masked / visible pixels (AR) and locations of each SR level, padding excluded.
            pixel_sums, sr_masks = [], {}
            if self.ar_enabled or self.sr_enabled:
                valid = self._valid_pixels(image_sizes[:N], padded_size)
                masked = valid & pixel_mask if pixel_mask is not None else torch.zeros_like(valid)
            if self.ar_enabled:
                pixel_sums += [masked.sum(), (valid & ~masked).sum()]
            if self.sr_enabled:
                for name in self.sr_predictors.in_features:
                    stride = self._strides[name]
                    size = (math.ceil(padded_size[0] / stride), math.ceil(padded_size[1] / stride))
                    sr_masks[name] = (mask_at_stride(masked, stride, size), mask_at_stride(valid, stride, size))
                    weight = semantic_reconstruction_weights(*sr_masks[name], self.sr_visible_weight)
                    pixel_sums.append(weight.sum())

        num_instances = sum(len(idx) for idx in sampled) if self.lcl_enabled else 0
        with record_function("drcl2.counts"):
            image_counts, instance_counts, pixel_norms = self._exchange_counts(N, num_instances, pixel_sums)

        with record_function("drcl2.online_forward"):
            if self.symmetric:
                feats = self.backbone(torch.cat([online_input, x2]))
                online1 = {k: v[:N] for k, v in feats.items()}
                online2 = {k: v[N:] for k, v in feats.items()}
            else:
                online1, online2 = self.backbone(online_input), None

        # One batched no-grad target forward over the views the enabled terms need.
        target1 = target2 = None
        need_t1 = self.sr_enabled or (self.symmetric and (self.hcl_enabled or self.lcl_enabled))
        need_t2 = self.hcl_enabled or self.lcl_enabled
        if need_t1 or need_t2:
            with record_function("drcl2.target_forward"), torch.no_grad():
                parts = ([x1] if need_t1 else []) + ([x2] if need_t2 else [])
                feats = self.target_network["backbone"](torch.cat(parts))
                target1 = {k: v[:N] for k, v in feats.items()} if need_t1 else None
                target2 = {k: v[-N:] for k, v in feats.items()} if need_t2 else None

        losses = {}
        zero_levels = list(self._unused_levels)
        if self.hcl_enabled:
            with record_function("drcl2.hcl"):
                losses["loss_hcl"] = self.hcl_weight * self._hcl_loss(
                    online1, online2, target1, target2, image_sizes[:N], image_sizes[N:], image_counts
                )
        if self.lcl_enabled:
            with record_function("drcl2.lcl"):
                lcl_heads = (self.lcl_projector, self.lcl_predictor, self.target_network["lcl_projector"])
                if batch_norm_trains(instance_counts, *lcl_heads):
                    inst, sup = self._lcl_losses(
                        online1, online2, target1, target2, boxes1, boxes2, sampled, term_weights["sup"],
                        instance_counts,
                    )
                else:
                    # Too few instances for the MLPs' batch norm (the same answer on every rank):
                    # a zero loss that still reaches every LCL parameter and level (DDP needs a
                    # gradient for each).
                    online_params = [p for m in (self.roi_heads,) + lcl_heads[:2] for p in m.parameters()]
                    inst = sum(p.sum() for p in online_params if p.requires_grad) * 0.0
                    sup = inst if self.lcl_supervised else None
                    zero_levels += self._lcl_only_levels
                losses["loss_lcl_inst"] = self.lcl_weight * inst
                if sup is not None:
                    losses["loss_lcl_sup"] = self.lcl_weight * self.lcl_sup_weight * sup
        sr_norms = pixel_norms[2:] if self.ar_enabled else pixel_norms  # (AR masked, AR visible, SR...)
        if self.ar_enabled:
            with record_function("drcl2.ar"):
                prediction = self.ar_decoder(online1[self.ar_in_feature])
                if prediction.shape[-2:] != x1.shape[-2:]:
                    raise ValueError(
                        f"DRCL2: the AR decoder predicts {tuple(prediction.shape[-2:])} pixels for a "
                        f"{tuple(x1.shape[-2:])} input; MODEL.DRCL2.AR.IN_FEATURE must be a level whose "
                        "stride divides the backbone's size_divisibility."
                    )
                target = x1 * (self.pixel_std / self.ar_pixel_std)  # padding stays 0 (ignored)
                losses["loss_ar"] = self.ar_weight * appearance_reconstruction_loss(
                    prediction, target, masked, valid, self.ar_visible_weight,
                    normalizers=(pixel_norms[0], pixel_norms[1]),
                )
        if self.sr_enabled:
            with record_function("drcl2.sr"):
                predictions = self.sr_predictors(online1)
                level_losses = []
                for (name, prediction), normalizer in zip(predictions.items(), sr_norms):
                    level_masked, level_valid = sr_masks[name]
                    if prediction.shape[-2:] != level_masked.shape[-2:]:
                        raise ValueError(
                            f"DRCL2: SR level {name!r} has size {tuple(prediction.shape[-2:])}, "
                            f"expected {tuple(level_masked.shape[-2:])} (padded input / stride "
                            f"{self._strides[name]}); check MODEL.DRCL2.SR.IN_FEATURES."
                        )
                    level_losses.append(
                        semantic_reconstruction_loss(
                            prediction, target1[name], level_masked, level_valid, self.sr_visible_weight,
                            normalizer=normalizer,
                        )
                    )
                losses["loss_sr"] = self.sr_weight * torch.stack(level_losses).mean()
        if self.proposal_generator is not None:
            with record_function("drcl2.rpn"):
                rpn_losses = rpn_losses_only(self.proposal_generator, online1, instances1)
                # detectron2 averages the RPN losses over this rank's images: rescale to the
                # global per-image mean (see the class doc).
                scale = self.rpn_weight * comm.get_world_size() * N / sum(image_counts)
                losses.update({k: scale * v for k, v in rpn_losses.items()})
        if zero_levels:
            first = next(iter(losses))
            losses[first] = losses[first] + sum(online1[f].sum() * 0.0 for f in zero_levels)
        return losses

    # ------------------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: List[Dict]):
        """
        Normalise and pad both views of every image into one :class:`ImageList` of 2N images
        (v1 of all images, then v2), so the views share one padded size.

        Returns:
            ImageList[2N], list[Instances] of v1, list[Instances] of v2 (on the model's device).
        """
        for i, x in enumerate(batched_inputs):
            if "view1" not in x or "view2" not in x:
                raise ValueError(
                    f"DRCL2 expects inputs from TwoViewDatasetMapper (keys 'view1', 'view2'); input "
                    f"{i} has keys {sorted(x)}. Use drcl2.engine.Trainer or pass "
                    "mapper=TwoViewDatasetMapper(cfg) to build_detection_train_loader."
                )
        views = [x["view1"] for x in batched_inputs] + [x["view2"] for x in batched_inputs]
        images = [(v["image"].to(self.device) - self.pixel_mean) / self.pixel_std for v in views]
        images = ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        N = len(batched_inputs)
        instances = [v["instances"].to(self.device) for v in views]
        for a, b in zip(instances[:N], instances[N:]):
            if len(a) != len(b):
                raise ValueError("DRCL2: the two views of an image must hold the same instances.")
        return images, instances[:N], instances[N:]

    def _lcl_instances(self, batched_inputs: List[Dict], instances1: List[Instances], instances2: List[Instances]):
        """
        The boxes LCL and box-guided masking draw from (``lcl_box_source``), as two lists of N
        ``Instances(gt_boxes, gt_classes)`` (v1, v2; rows aligned; class -1: unlabelled proposal).
        """
        if self.lcl_box_source == "gt":
            return instances1, instances2
        views = []
        for v in ("view1", "view2"):
            out = []
            for i, x in enumerate(batched_inputs):
                if "proposals" not in x[v]:
                    raise ValueError(
                        f"DRCL2: MODEL.DRCL2.LCL.BOX_SOURCE is 'proposals' but input {i} "
                        f"(image {x.get('image_id')!r}) has no {v} 'proposals'. Build the data with "
                        "TwoViewDatasetMapper from the same config (it carries the proposals of "
                        "DATASETS.PROPOSAL_FILES_TRAIN when MODEL.LOAD_PROPOSALS is True)."
                    )
                p = x[v]["proposals"].to(self.device)
                out.append(Instances(p.image_size, gt_boxes=p.proposal_boxes, gt_classes=p.gt_classes))
            views.append(out)
        for a, b in zip(*views):
            if len(a) != len(b):
                raise ValueError("DRCL2: the two views of an image must hold the same proposals.")
        return views[0], views[1]

    def _valid_pixels(self, image_sizes, padded_size) -> torch.Tensor:
        """BoolTensor[N, H, W]: True inside each image, False on padding."""
        valid = torch.zeros((len(image_sizes), *padded_size), dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(image_sizes):
            valid[i, :h, :w] = True
        return valid

    def _draw(
        self, batched_inputs, instance_weights, mask_weights, image_sizes, padded_size, iteration, lcl_instances=None
    ):
        """
        The random draws of one step, each image from its own generator seeded by
        ``(seed, iteration, image_id)``: K instances of v1 (LCL, box-guided masking) with
        probability ∝ ``instance_weights`` of their classes, then the masked patches of x1, placed
        in the drawn boxes with probability ∝ ``mask_weights`` of their classes.

        Args:
            batched_inputs: the N input dicts.
            instance_weights, mask_weights: Tensor[C], w_c(lambda) (or 1 where DRB.APPLY_TO
                leaves the term out).
            image_sizes: N (h, w) of v1 without padding.
            padded_size: (H, W) of the padded batch.
            iteration: the training iteration.
            lcl_instances: N Instances of v1 to draw from (:meth:`_lcl_instances`); default: those
                of ``batched_inputs``.

        Returns:
            list of N LongTensor[K_i] on the model's device (indices into the image's instances,
            the same rows in both views), or N None when nothing needs instances;
            BoolTensor[N, H, W] (True = masked pixel of x1) on the model's device, or None.
        """
        need_sampled = self.lcl_enabled or (self.masking_enabled and self.mask_box_guided > 0)
        if not (need_sampled or self.masking_enabled):
            return [None] * len(batched_inputs), None
        instance_weights, mask_weights = instance_weights.cpu(), mask_weights.cpu()
        if lcl_instances is None:
            lcl_instances = self._lcl_instances(
                batched_inputs, [x["view1"]["instances"] for x in batched_inputs],
                [x["view2"]["instances"] for x in batched_inputs],
            )[0]
        sampled, masks, occurrences = [], [], {}
        for i, (x, inst, size) in enumerate(zip(batched_inputs, lcl_instances, image_sizes)):
            key = _image_key(x, i, len(batched_inputs))
            occurrences[key] = occurrences.get(key, -1) + 1  # an image repeated in the batch
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, iteration, key, occurrences[key]))
            classes = inst.gt_classes.cpu()
            idx = None
            if need_sampled:
                idx = sample_instances(classes, instance_weights, self.lcl_num_instances, generator)
            if self.masking_enabled:
                if idx is not None and len(idx):
                    boxes = inst.gt_boxes.tensor.cpu()[idx]
                    box_weights = instance_class_weights(classes[idx], mask_weights)
                else:
                    boxes, box_weights = torch.zeros(0, 4), torch.zeros(0)
                patches = box_guided_patch_mask(
                    tuple(size), self.mask_patch_size, self.mask_ratio, boxes, box_weights,
                    self.mask_box_guided, generator=generator,
                )
                masks.append(patch_mask_to_pixels(patches, self.mask_patch_size, padded_size))
            sampled.append(idx.to(self.device) if idx is not None else None)
        pixel_mask = torch.stack(masks).to(self.device) if masks else None
        return sampled, pixel_mask

    def _exchange_counts(self, num_images: int, num_instances: int, pixel_sums: List[torch.Tensor]):
        """
        The counts of the step of every rank, in one collective (:func:`all_gather_counts`).

        Args:
            num_images, num_instances: this rank's images and sampled instances.
            pixel_sums: this rank's masked / visible pixel counts (AR) and SR weight sums, 0-dim.

        Returns:
            list[int] images of every rank, list[int] instances of every rank (rank order),
            Tensor[P]: the DDP normalisers of ``pixel_sums`` (global sums / world size).
        """
        local = torch.tensor([num_images, num_instances], dtype=torch.float64, device=self.device)
        if pixel_sums:
            local = torch.cat([local, torch.stack(pixel_sums).double()])
        gathered = all_gather_counts(local)  # [W, 2 + P]
        if comm.get_world_size() == 1:
            image_counts, instance_counts = [num_images], [num_instances]
        else:
            image_counts, instance_counts = gathered[:, :2].round().long().t().tolist()
        return image_counts, instance_counts, ddp_normalizer(gathered[:, 2:].sum(dim=0))

    def _image_vector(self, features: Dict[str, torch.Tensor], image_sizes) -> torch.Tensor:
        """
        h: the mean over ``hcl_in_features`` of global average pooling over the image (padding
        excluded: a location counts when its stride cell starts inside the image).

        Args:
            features: level -> Tensor[N, C, H_l, W_l].
            image_sizes: N (h, w) of the unpadded images.

        Returns:
            Tensor[N, C], float32 or wider.
        """
        pooled = []
        for name in self.hcl_in_features:
            f = at_least_float32(features[name])
            n, _, fh, fw = f.shape
            stride = self._strides[name]
            valid = torch.zeros((n, 1, fh, fw), dtype=f.dtype, device=f.device)
            for i, (h, w) in enumerate(image_sizes):
                valid[i, :, : math.ceil(h / stride), : math.ceil(w / stride)] = 1
            pooled.append((f * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)))
        return torch.stack(pooled).mean(dim=0)

    def _hcl_loss(self, online1, online2, target1, target2, sizes1, sizes2, image_counts):
        """
        L_HCL (unweighted) from the online / target features of the views.

        Args:
            image_counts: images of every rank (global normalisation, InfoNCE keys).
        """
        heads = (self.hcl_projector, self.hcl_predictor, self.target_network["hcl_projector"])
        if not batch_norm_trains(image_counts, *heads):
            raise ValueError(
                f"DRCL2: the HCL MLPs' batch norm (MODEL.DRCL2.HEAD_NORM) cannot train on "
                f"{image_counts} image(s) per process. Use more images per batch "
                "(SOLVER.IMS_PER_BATCH; per process: IMS_PER_BATCH / number of processes) or a "
                "HEAD_NORM without batch statistics ('GN', 'LN', '')."
            )
        z1 = self.hcl_predictor(self.hcl_projector(self._image_vector(online1, sizes1)))
        target_projector = self.target_network["hcl_projector"]
        with torch.no_grad():
            if self.symmetric:  # one batched call over both views (BN statistics over 2N)
                t = target_projector(
                    torch.cat([self._image_vector(target1, sizes1), self._image_vector(target2, sizes2)])
                )
                t1, t2 = t[: len(z1)], t[len(z1):]
            else:
                t2 = target_projector(self._image_vector(target2, sizes2))
        if self.symmetric:
            z2 = self.hcl_predictor(self.hcl_projector(self._image_vector(online2, sizes2)))
        normalizer = ddp_normalizer(sum(image_counts))
        if self.hcl_loss == "byol":
            loss = byol_loss(z1, t2, normalizer)
            if self.symmetric:
                loss = 0.5 * (loss + byol_loss(z2, t1, normalizer))
            return loss
        # InfoNCE against the keys of the global batch: one gather (both views' keys if symmetric).
        keys = all_gather_rows(torch.cat([t2, t1], dim=1) if self.symmetric else t2, image_counts)
        dim = t2.shape[1]
        positives = torch.arange(len(z1), device=z1.device) + sum(image_counts[: comm.get_rank()])
        loss = info_nce_loss(z1, keys[:, :dim], positives, self.hcl_temperature, normalizer)
        if self.symmetric:
            loss = 0.5 * (loss + info_nce_loss(z2, keys[:, dim:], positives, self.hcl_temperature, normalizer))
        return loss

    def _lcl_losses(
        self, online1, online2, target1, target2, instances1, instances2, sampled, weights, instance_counts
    ):
        """
        Args:
            instances1, instances2: N Instances(gt_boxes, gt_classes) of the views (class -1: an
                unlabelled proposal, in L_inst only).
            sampled: N LongTensor, the sampled rows of each image's instances (both views).
            weights: Tensor[C], w_c(lambda).
            instance_counts: sampled instances of every rank.

        Returns:
            (L_inst, L_sup or None): scalar Tensors, unweighted.
        """
        boxes1 = [inst.gt_boxes[idx] for inst, idx in zip(instances1, sampled)]
        boxes2 = [inst.gt_boxes[idx] for inst, idx in zip(instances2, sampled)]
        classes = torch.cat([inst.gt_classes[idx] for inst, idx in zip(instances1, sampled)])

        def online_embed(features, boxes):
            return self.lcl_predictor(self.lcl_projector(self.roi_heads(features, boxes)))

        target_head = self.target_network["box_head"]
        target_projector = self.target_network["lcl_projector"]
        with torch.no_grad():
            if self.symmetric:  # one batched call over both views
                both = {k: torch.cat([target1[k], target2[k]]) for k in self.roi_heads.box_in_features}
                t = target_projector(self.roi_heads(both, boxes1 + boxes2, box_head=target_head))
                t1, t2 = t[: len(classes)], t[len(classes):]
            else:
                t2 = target_projector(self.roi_heads(target2, boxes2, box_head=target_head))
        normalizer = ddp_normalizer(sum(instance_counts))
        e1 = online_embed(online1, boxes1)
        inst = byol_loss(e1, t2, normalizer)
        if self.symmetric:
            e2 = online_embed(online2, boxes2)
            inst = 0.5 * (inst + byol_loss(e2, t1, normalizer))
        if not self.lcl_supervised:
            return inst, None

        # The whole payload of the global batch in one gather: class, target embedding of v2
        # (and of v1 when symmetric); class ids are exact in float32 below 2**24.
        payload = [classes[:, None].float(), at_least_float32(t2)]
        payload += [at_least_float32(t1)] if self.symmetric else []
        gathered = all_gather_rows(torch.cat(payload, dim=1), instance_counts)
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
        sup = balanced_supervised_contrastive_loss(
            e1[labelled], anchor_classes, instance_weights, gathered[:, 1 : 1 + dim], all_classes,
            self.lcl_temperature, sup_normalizer,
        )
        if self.symmetric:
            sup = 0.5 * (
                sup
                + balanced_supervised_contrastive_loss(
                    e2[labelled], anchor_classes, instance_weights, gathered[:, 1 + dim :], all_classes,
                    self.lcl_temperature, sup_normalizer,
                )
            )
        return inst, sup


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
    pred_objectness_logits = [score.permute(0, 2, 3, 1).flatten(1) for score in pred_objectness_logits]
    box_dim = rpn.anchor_generator.box_dim
    pred_anchor_deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
        for x in pred_anchor_deltas
    ]
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt_instances)
    return rpn.losses(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)


def _image_key(x: Dict, index: int, num_images: int) -> int:
    """
    The integer that seeds an image's draws: its dataset ``image_id`` (strings hashed with CRC32,
    stable across processes); without one, its position in the global batch assuming every rank
    holds ``num_images`` images (as detectron2's loaders give).
    """
    image_id = x.get("image_id")
    if isinstance(image_id, int):
        return image_id
    if image_id is not None:
        return zlib.crc32(str(image_id).encode())
    return comm.get_rank() * num_images + index


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser over them): neighbouring keys give unrelated streams."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & mask)) + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def check_drcl2_config(cfg) -> None:
    """
    Validate ``MODEL.DRCL2`` (and the keys DRCL2 reads elsewhere); raise ValueError naming the key.
    """
    d = cfg.MODEL.DRCL2

    def fail(key, value, why):
        raise ValueError(f"{key} = {value!r}: {why}")

    parts = {k: d[k].ENABLED for k in ("HCL", "LCL", "AR", "SR", "RPN")}
    if not any(parts.values()):
        fail("MODEL.DRCL2.{HCL,LCL,AR,SR,RPN}.ENABLED", parts, "every part is off; enable at least one.")
    for key in ("HCL.WEIGHT", "LCL.WEIGHT", "LCL.SUP_WEIGHT", "AR.WEIGHT", "SR.WEIGHT", "RPN.WEIGHT",
                "AR.VISIBLE_WEIGHT", "SR.VISIBLE_WEIGHT"):
        group, name = key.split(".")
        value = d[group][name]
        if not (value >= 0 and math.isfinite(value)):
            fail(f"MODEL.DRCL2.{key}", value, "must be a finite number >= 0.")
    if not 0.0 <= d.BASE_MOMENTUM <= 1.0:
        fail("MODEL.DRCL2.BASE_MOMENTUM", d.BASE_MOMENTUM, "must lie in [0, 1].")
    if d.HCL.LOSS not in HCL_LOSSES:
        fail("MODEL.DRCL2.HCL.LOSS", d.HCL.LOSS, f"must be one of {HCL_LOSSES}.")
    for key in ("HCL.TEMPERATURE", "LCL.TEMPERATURE"):
        group, name = key.split(".")
        if not d[group][name] > 0:
            fail(f"MODEL.DRCL2.{key}", d[group][name], "must be > 0.")
    if int(d.LCL.NUM_INSTANCES) != d.LCL.NUM_INSTANCES or d.LCL.NUM_INSTANCES < 1:
        fail("MODEL.DRCL2.LCL.NUM_INSTANCES", d.LCL.NUM_INSTANCES, "K must be an integer >= 1.")
    if d.LCL.BOX_SOURCE not in BOX_SOURCES:
        fail("MODEL.DRCL2.LCL.BOX_SOURCE", d.LCL.BOX_SOURCE, f"must be one of {BOX_SOURCES}.")
    if d.LCL.BOX_SOURCE == "proposals":
        if not cfg.MODEL.LOAD_PROPOSALS:
            fail(
                "MODEL.LOAD_PROPOSALS", cfg.MODEL.LOAD_PROPOSALS,
                "MODEL.DRCL2.LCL.BOX_SOURCE 'proposals' reads precomputed proposals: set it True and "
                "DATASETS.PROPOSAL_FILES_TRAIN to one file per training set "
                "(python -m drcl2.tools.dump_proposals writes them).",
            )
        if len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) != len(cfg.DATASETS.TRAIN):
            fail(
                "DATASETS.PROPOSAL_FILES_TRAIN", tuple(cfg.DATASETS.PROPOSAL_FILES_TRAIN),
                f"MODEL.DRCL2.LCL.BOX_SOURCE 'proposals' needs one proposal file per dataset of "
                f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}.",
            )
    if int(d.LCL.PROPOSAL_TOPK) != d.LCL.PROPOSAL_TOPK or d.LCL.PROPOSAL_TOPK < 1:
        fail("MODEL.DRCL2.LCL.PROPOSAL_TOPK", d.LCL.PROPOSAL_TOPK, "must be an integer >= 1.")
    if not 0.0 < d.LCL.PROPOSAL_MATCH_IOU <= 1.0:
        fail("MODEL.DRCL2.LCL.PROPOSAL_MATCH_IOU", d.LCL.PROPOSAL_MATCH_IOU, "must lie in (0, 1].")
    if not 0.0 <= d.MASK.RATIO < 1.0:
        fail("MODEL.DRCL2.MASK.RATIO", d.MASK.RATIO, "the masked fraction must lie in [0, 1).")
    if not 0.0 <= d.MASK.BOX_GUIDED <= 1.0:
        fail("MODEL.DRCL2.MASK.BOX_GUIDED", d.MASK.BOX_GUIDED, "must lie in [0, 1].")
    if int(d.MASK.PATCH_SIZE) != d.MASK.PATCH_SIZE or d.MASK.PATCH_SIZE < 1:
        fail("MODEL.DRCL2.MASK.PATCH_SIZE", d.MASK.PATCH_SIZE, "must be an integer >= 1 (pixels).")
    norms = ("", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "GN", "LN")
    if d.HEAD_NORM not in norms:
        fail("MODEL.DRCL2.HEAD_NORM", d.HEAD_NORM, f"must be one of {norms} (detectron2 get_norm names).")
    for key in ("MLP_HIDDEN_DIM", "MLP_OUT_DIM"):
        if d[key] < 1:
            fail(f"MODEL.DRCL2.{key}", d[key], "must be >= 1.")
    if not set(d.DRB.APPLY_TO) <= set(DRB_TERMS) or len(set(d.DRB.APPLY_TO)) != len(d.DRB.APPLY_TO):
        fail("MODEL.DRCL2.DRB.APPLY_TO", d.DRB.APPLY_TO, f"must list distinct terms among {DRB_TERMS}.")
    dynamic_sampler = cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler"
    if bool(d.DRB.ENABLED) != dynamic_sampler:
        # DRB has two halves, the class weights here and the image repeats in the sampler; one
        # without the other is not the method, and its logged λ would mislead.
        raise ValueError(
            f"MODEL.DRCL2.DRB.ENABLED = {d.DRB.ENABLED} but DATALOADER.SAMPLER_TRAIN = "
            f"{cfg.DATALOADER.SAMPLER_TRAIN!r}: dynamic rebalancing is switched by both together. "
            "Set DRB.ENABLED True with SAMPLER_TRAIN 'DynamicRepeatFactorTrainingSampler', or "
            "DRB.ENABLED False with another sampler (e.g. 'RepeatFactorTrainingSampler')."
        )
    if cfg.SOLVER.MAX_ITER < 1:
        fail("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, "DRCL2's momentum and DRB schedules need >= 1.")
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 1:
        fail("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "must be >= 1.")
    if len(cfg.DATASETS.TEST):
        fail(
            "DATASETS.TEST", tuple(cfg.DATASETS.TEST),
            "DRCL2 pre-training has no inference, so nothing to evaluate (the run would train, then "
            "fail in evaluation and skip the export). Set DATASETS.TEST to (); fine-tune the "
            "exported weights and evaluate the fine-tuned detector.",
        )


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
        ok = sorted(f for f, s in strides.items() if size_divisibility >= s and size_divisibility % s == 0)
        raise ValueError(
            f"MODEL.DRCL2.AR.IN_FEATURE = {ar_in_feature!r}: its stride ({stride}) does not divide "
            f"the backbone's padding multiple (size_divisibility {size_divisibility}), so the "
            f"decoder's x{stride} upsampling would not match the image. Use one of {ok}."
        )


def check_feature_levels(cfg, levels) -> None:
    """Raise ValueError when an enabled part reads a level the backbone does not produce."""
    d = cfg.MODEL.DRCL2
    for key, names in (("HCL.IN_FEATURES", d.HCL.IN_FEATURES), ("SR.IN_FEATURES", d.SR.IN_FEATURES),
                       ("AR.IN_FEATURE", [d.AR.IN_FEATURE])):
        group = key.split(".")[0]
        if d[group].ENABLED and (not names or not set(names) <= set(levels)):
            raise ValueError(
                f"MODEL.DRCL2.{key} = {names!r}: must name backbone outputs among {sorted(levels)}."
            )
