"""
The 2DRCL pre-training meta-architecture (docs/method.md): ``MODEL.META_ARCHITECTURE: "DRCL2"``.
"""

import math
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.profiler import record_function

from ..data.rebalance import (
    RebalanceSchedule,
    class_weights,
    instance_class_weights,
    sample_instances,
)
from .distributed import all_gather_counts, ddp_normalizer
from .ema import cosine_momentum, make_target, momentum_update
from .hcl_head import HCL_LOSSES
from .lcl_head import LCL_LOSSES
from .masking import box_guided_patch_mask, patch_mask_to_pixels
from .pretext_head import PretextHead, StepContext, build_pretext_heads, feature_channels
from .rpn_loss_head import RPN_TARGETS

__all__ = ["DRCL2", "check_drcl2_config"]

BOX_SOURCES = ("gt", "proposals")  # MODEL.DRCL2.LCL.BOX_SOURCE
DRB_TERMS = ("instances", "sup", "masking")  # where the class weights w_c(lambda) act in the model
ONLINE_VIEWS = (
    "reconstruction",
    "all",
)  # MODEL.DRCL2.MASK.ONLINE_VIEW: which heads see the masked view


@META_ARCH_REGISTRY.register()
class DRCL2(nn.Module):
    """
    2DRCL pre-training: holistic (HCL) and local (LCL) contrastive learning against an EMA target
    network, dual reconstruction (AR, SR) from a box-guided masked view, the RPN loss, and dynamic
    rebalancing (DRB) of instance selection. Each pretext task is a registered head
    (:mod:`drcl2.modeling.pretext_head`; ``MODEL.DRCL2.<PART>.ENABLED`` and ``EXTRA_HEADS``): the
    model runs the shared part of a step (views, draws, masking, online and target backbones,
    count exchange, EMA), hands each head a :class:`StepContext` and collects its losses.

    Online modules carry the names of detectron2's ``GeneralizedRCNN`` (``backbone``,
    ``proposal_generator``, ``roi_heads.box_pooler``, ``roi_heads.box_head``) so their weights
    fine-tune in a stock detectron2 detector (see :func:`drcl2.checkpoint.export_finetune_weights`).
    The target network lives under ``target_network.*``.

    Input: a list of dicts from :class:`drcl2.data.TwoViewDatasetMapper`, each with ``"view1"`` and
    ``"view2"`` = ``{"image": Tensor[3, H, W], "instances": Instances(gt_boxes, gt_classes, ...)}``,
    instances row-aligned across the views, and the dataset's ``"image_id"``; with
    ``lcl_box_source="proposals"`` each view also holds ``"proposals"`` =
    ``Instances(proposal_boxes, gt_classes)`` (class -1: unlabelled), LCL's and box-guided masking's
    boxes. Output (training only): a dict of losses with the keys of the enabled heads:
    ``loss_hcl``, ``loss_lcl_inst``, ``loss_lcl_sup``, ``loss_ar``, ``loss_sr``, ``loss_rpn_cls``,
    ``loss_rpn_loc``.

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
        heads: Sequence[PretextHead],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_classes: int,
        max_iter: int,
        base_momentum: float = 0.99,
        symmetric: bool = False,
        lcl_num_instances: int = 8,
        lcl_box_source: str = "gt",
        rebalance_schedule: Optional[RebalanceSchedule] = None,
        drb_apply_to: Sequence[str] = DRB_TERMS,
        repeat_thresh: float = 0.001,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.5,
        mask_box_guided: float = 0.5,
        mask_online_view: str = "reconstruction",
        seed: Optional[int] = None,
    ):
        """
        Args:
            backbone: a detectron2 backbone (ResNet-FPN), the online encoder.
            heads: the pretext heads (:class:`PretextHead`, at least one); the model owns the
                modules each declares (``online_modules``), under the names it gives them.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            num_classes: C, the number of classes of the training set.
            max_iter: K, the length of the schedule (momentum and DRB progress).
            base_momentum: m0 of the cosine momentum schedule.
            symmetric: the heads also train the swapped pair (online x2 vs target x1): the online
                backbone then also runs on x2.
            lcl_num_instances: K instances drawn per image (for the heads that need instances,
                and box-guided masking).
            lcl_box_source: where the drawn boxes come from: "gt" (the views' annotated
                ``instances``) or "proposals" (the views' ``proposals``; an unlabelled one, class
                -1, weighs 1 in the draws and masking and is left out of L_sup).
            rebalance_schedule: lambda(progress) of DRB; None disables DRB (uniform class weights).
            drb_apply_to: where the class weights w_c(lambda) act inside the model, among
                ``DRB_TERMS``: "instances" (which K instances are drawn), "sup" (the L_sup weights),
                "masking" (where box-guided masking puts its patches); elsewhere weights are 1.
            repeat_thresh: t of the class repeat factors (``DATALOADER.DRCL2.REPEAT_THRESHOLD``).
            mask_patch_size, mask_ratio, mask_box_guided: patch masking of x1 (used when a head
                has ``masks_input``: AR, SR).
            mask_online_view: "reconstruction": only the heads with ``masks_input`` read the
                masked view 1 (the online backbone runs on x1 and on the masked x1 in one batch);
                "all": the online backbone sees only the masked view, every head reads it (2DRCL
                v1: the mask's placement then tells the RPN and LCL where the objects are).
            seed: base seed of the per-image random draws (instances, masked patches); None: a
                seed drawn from torch's generator when the model is built.
        """
        super().__init__()
        if not heads:
            raise ValueError("DRCL2: give at least one pretext head.")
        if lcl_box_source not in BOX_SOURCES:
            raise ValueError(
                f"DRCL2: lcl_box_source must be one of {BOX_SOURCES}; got {lcl_box_source!r}."
            )
        if mask_online_view not in ONLINE_VIEWS:
            raise ValueError(
                f"DRCL2: mask_online_view must be one of {ONLINE_VIEWS}; got {mask_online_view!r}."
            )
        if not set(drb_apply_to) <= set(DRB_TERMS):
            raise ValueError(
                f"DRCL2: drb_apply_to must be among {DRB_TERMS}; got {tuple(drb_apply_to)}."
            )
        self.backbone = backbone
        # Strides of the levels, from the backbone (never inferred from feature sizes: a level whose
        # stride exceeds the padding multiple, e.g. p6, has ceil-rounded sizes).
        self._strides = {name: shape.stride for name, shape in backbone.output_shape().items()}
        self.heads = list(heads)  # plain list: the model owns the heads' modules, by their names
        for head in self.heads:
            head.check(self._strides, backbone.size_divisibility)
            for name, module in head.online_modules().items():
                if name in self._modules or hasattr(self, name):
                    raise ValueError(
                        f"DRCL2: {head.name} declares module {name!r}, which is already taken."
                    )
                self.add_module(name, module)

        self.num_classes = num_classes
        self.max_iter = max_iter
        self.base_momentum = base_momentum
        self.symmetric = symmetric
        self.lcl_num_instances = lcl_num_instances
        self.lcl_box_source = lcl_box_source
        self.rebalance_schedule = rebalance_schedule
        self.drb_apply_to = tuple(drb_apply_to)
        self.repeat_thresh = repeat_thresh
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.mask_box_guided = mask_box_guided
        self.mask_online_view = mask_online_view
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)

        # Target network: EMA copies of exactly the modules the heads declare (the backbone when a
        # head reads target features), under their target names.
        self._target_paths = {}
        if any(h.target_views for h in self.heads):
            self._target_paths["backbone"] = "backbone"
        for head in self.heads:
            for name, path in head.target_modules().items():
                if self._target_paths.get(name, path) != path:
                    raise ValueError(
                        f"DRCL2: target module {name!r} declared for two online modules."
                    )
                self._target_paths[name] = path
        self.target_network = nn.ModuleDict(
            {
                name: make_target(self.get_submodule(path))
                for name, path in self._target_paths.items()
            }
        )

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # r_c^ins of the training set (w_c(lambda) = r_c^ins ** lambda); 1 until handed over.
        self.register_buffer("class_repeat_factors", torch.ones(num_classes))
        self.register_buffer("class_statistics_set", torch.tensor(False))
        # False until the target network was copied from the (possibly freshly loaded) online one.
        self.register_buffer("target_initialized", torch.tensor(False))
        # The iteration of the last training forward, and whether its EMA step is still to be
        # applied (at the next new iteration): the model's own target-update schedule.
        self.register_buffer("last_iteration", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("target_update_pending", torch.tensor(False))

        # FPN levels no head reads join the graph with a zero weight so that DDP
        # (find_unused_parameters=False) sees a gradient for every backbone parameter; so do, at a
        # step, the levels read only by heads that skip it (e.g. LCL with too few instances).
        read = {f for h in self.heads for f in h.in_features}
        self._unused_levels = [f for f in self._strides if f not in read]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg):
        check_drcl2_config(cfg)
        d = cfg.MODEL.DRCL2
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        check_feature_levels(cfg, shapes)
        feature_channels(shapes)
        ret = {
            "backbone": backbone,
            "heads": build_pretext_heads(cfg, shapes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "base_momentum": d.BASE_MOMENTUM,
            "symmetric": d.SYMMETRIC,
            "lcl_num_instances": d.LCL.NUM_INSTANCES,
            "lcl_box_source": d.LCL.BOX_SOURCE,
            "repeat_thresh": cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD,
            "mask_patch_size": d.MASK.PATCH_SIZE,
            "mask_ratio": d.MASK.RATIO,
            "mask_box_guided": d.MASK.BOX_GUIDED,
            "mask_online_view": d.MASK.ONLINE_VIEW,
            "seed": cfg.SEED if cfg.SEED >= 0 else None,
        }
        if d.DRB.ENABLED:
            ret["rebalance_schedule"] = RebalanceSchedule.from_config(cfg)
            ret["drb_apply_to"] = tuple(d.DRB.APPLY_TO)
        return ret

    # ------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def needs_instances(self) -> bool:
        """Some head uses the drawn instances."""
        return any(h.needs_instances for h in self.heads)

    @property
    def masking_enabled(self) -> bool:
        """A reconstruction head (``masks_input``: AR, SR) makes the online network see the masked
        view."""
        return any(h.masks_input for h in self.heads) and self.mask_ratio > 0

    def online_target_pairs(self) -> Dict[str, nn.Module]:
        """Name in ``target_network`` -> the online module it follows (looked up now)."""
        return {name: self.get_submodule(path) for name, path in self._target_paths.items()}

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

    def term_weights_at(self, iteration: int) -> Tuple[float, Dict[str, torch.Tensor]]:
        """
        DRB at ``iteration``: lambda, and the class weights of each term of ``DRB_TERMS``
        (``{term: Tensor[C]}``): w_c(lambda) for the terms of DRB.APPLY_TO, 1 for the others.
        """
        lam = 0.0
        if self.rebalance_schedule is not None:
            lam = self.rebalance_schedule.lam(iteration / max(self.max_iter, 1))
        weights = self.class_weights_at(lam)  # [C]
        return lam, {
            t: weights if t in self.drb_apply_to else torch.ones_like(weights) for t in DRB_TERMS
        }

    @torch.no_grad()
    def draws(self, batched_inputs: List[Dict], iteration: int):
        """
        The random draws a training step at ``iteration`` makes for ``batched_inputs`` (the same
        :meth:`_draw` as :meth:`forward`, with the same class weights; no network runs and no
        global random state is used), to look at what a step trains on
        (``python -m drcl2.tools.visualize views``, ``VIS_PERIOD``).

        Args:
            batched_inputs: N dicts from :class:`TwoViewDatasetMapper`, the whole batch of the step
                (an image repeated in a batch draws differently each time).
            iteration: the training iteration.

        Returns:
            list of N LongTensor[K_i] (the instances drawn for LCL / box-guided masking: rows of
            the LCL boxes, ``view*/instances`` or ``view*/proposals``) or N None;
            list of N BoolTensor[h_i, w_i] (True = masked pixel of view 1, (h_i, w_i) its size)
            or None when nothing masks.
        """
        _, term_weights = self.term_weights_at(iteration)
        sizes = [tuple(x["view1"]["image"].shape[-2:]) for x in batched_inputs]
        padded_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
        sampled, pixel_mask = self._draw(
            batched_inputs,
            term_weights["instances"],
            term_weights["masking"],
            sizes,
            padded_size,
            iteration,
        )
        if pixel_mask is None:
            return sampled, None
        return sampled, [m[:h, :w].cpu() for m, (h, w) in zip(pixel_mask, sizes)]

    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: a list of N dicts from :class:`TwoViewDatasetMapper`.

        Returns:
            dict[str, Tensor]: the weighted losses of every head; with several processes, this
            rank's share as the class doc describes (their average over ranks is the loss of the
            global batch).
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
        lam, term_weights = self.term_weights_at(iteration)
        if storage is not None:
            storage.put_scalar("drcl2/lambda", lam, smoothing_hint=False)
            # the momentum of this iteration's EMA step (applied at the start of the next one)
            momentum = cosine_momentum(self.base_momentum, iteration, self.max_iter)
            storage.put_scalar("drcl2/momentum", momentum, smoothing_hint=False)

        images, instances1, instances2 = self.preprocess(batched_inputs)
        targets1 = None
        if all("targets" in x["view1"] for x in batched_inputs):
            targets1 = [x["view1"]["targets"].to(self.device) for x in batched_inputs]
        boxes1, boxes2 = self._lcl_instances(batched_inputs, instances1, instances2)
        N = len(batched_inputs)
        image_sizes = images.image_sizes
        padded_size = tuple(images.tensor.shape[-2:])
        x1, x2 = images.tensor[:N], images.tensor[N:]

        with record_function("drcl2.masking"):
            sampled, pixel_mask = self._draw(
                batched_inputs,
                term_weights["instances"],
                term_weights["masking"],
                image_sizes[:N],
                padded_size,
                iteration,
                lcl_instances=boxes1,
            )
            online_input = x1
            if pixel_mask is not None:
                online_input = x1 * (~pixel_mask)[:, None].to(x1.dtype)
            # Masked / visible pixels, padding excluded.
            valid = self._valid_pixels(image_sizes[:N], padded_size)
            masked = valid & pixel_mask if pixel_mask is not None else torch.zeros_like(valid)
            ctx = StepContext(
                model=self,
                x1=x1,
                image_sizes1=image_sizes[:N],
                image_sizes2=image_sizes[N:],
                padded_size=padded_size,
                instances1=instances1,
                instances2=instances2,
                boxes1=boxes1,
                boxes2=boxes2,
                sampled=sampled,
                class_weights=term_weights,
                masked=masked,
                valid=valid,
                targets1=targets1,
            )
            head_sums = [head.counts(ctx) for head in self.heads]

        num_instances = sum(len(idx) for idx in sampled) if self.needs_instances else 0
        with record_function("drcl2.counts"):
            ctx.image_counts, ctx.instance_counts, norms = self._exchange_counts(
                N, num_instances, [x for sums in head_sums for x in sums]
            )

        with record_function("drcl2.online_forward"):
            # One batched online forward: view 1 (masked for every head in "all" mode), the masked
            # view 1 for the reconstruction heads when other heads read it unmasked, view 2 when
            # symmetric.
            clean_readers = any(not h.masks_input for h in self.heads)
            legacy = self.mask_online_view == "all"
            separate_masked = pixel_mask is not None and clean_readers and not legacy
            parts = [online_input if legacy or not clean_readers else x1]
            parts += [online_input] if separate_masked else []
            parts += [x2] if self.symmetric else []
            feats = self.backbone(torch.cat(parts)) if len(parts) > 1 else self.backbone(parts[0])
            ctx.online1 = {k: v[:N] for k, v in feats.items()} if len(parts) > 1 else feats
            ctx.online_masked = (
                {k: v[N : 2 * N] for k, v in feats.items()} if separate_masked else ctx.online1
            )
            if self.symmetric:
                ctx.online2 = {k: v[-N:] for k, v in feats.items()}

        # One batched no-grad target forward over the views the heads need.
        need_t1 = any(1 in h.target_views for h in self.heads)
        need_t2 = any(2 in h.target_views for h in self.heads)
        if need_t1 or need_t2:
            with record_function("drcl2.target_forward"), torch.no_grad():
                parts = ([x1] if need_t1 else []) + ([x2] if need_t2 else [])
                feats = self.target_network["backbone"](torch.cat(parts))
                ctx.target1 = {k: v[:N] for k, v in feats.items()} if need_t1 else None
                ctx.target2 = {k: v[-N:] for k, v in feats.items()} if need_t2 else None

        losses, start = {}, 0
        for head, sums in zip(self.heads, head_sums):
            with record_function(f"drcl2.{head.name}"):
                head_losses = head.losses(ctx, norms[start : start + len(sums)])
            start += len(sums)
            taken = set(head_losses) & set(losses)
            if taken:
                raise ValueError(
                    f"DRCL2: {head.name} returns losses {sorted(taken)} that another head returns."
                )
            losses.update(head_losses)
        zero_levels = list(self._unused_levels)
        if ctx.skipped:
            still_read = {f for h in self.heads if h not in ctx.skipped for f in h.in_features}
            zero_levels += [
                f for f in self._strides if f not in still_read and f not in zero_levels
            ]
        if zero_levels:
            first = next(iter(losses))
            losses[first] = losses[first] + sum(ctx.online1[f].sum() * 0.0 for f in zero_levels)
        return losses

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
                    "DRCL2 expects inputs from TwoViewDatasetMapper (keys 'view1', 'view2'); "
                    f"input {i} has keys {sorted(x)}. Use drcl2.engine.Trainer or pass "
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

    def _lcl_instances(
        self, batched_inputs: List[Dict], instances1: List[Instances], instances2: List[Instances]
    ):
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
                        f"DRCL2: MODEL.DRCL2.LCL.BOX_SOURCE is 'proposals' but input {i} (image "
                        f"{x.get('image_id')!r}) has no {v} 'proposals'. Build the data with "
                        "TwoViewDatasetMapper from the same config (it carries the proposals of "
                        "DATASETS.PROPOSAL_FILES_TRAIN when MODEL.LOAD_PROPOSALS is True)."
                    )
                p = x[v]["proposals"].to(self.device)
                out.append(
                    Instances(p.image_size, gt_boxes=p.proposal_boxes, gt_classes=p.gt_classes)
                )
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
        self,
        batched_inputs,
        instance_weights,
        mask_weights,
        image_sizes,
        padded_size,
        iteration,
        lcl_instances=None,
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
        need_sampled = self.needs_instances or (self.masking_enabled and self.mask_box_guided > 0)
        if not (need_sampled or self.masking_enabled):
            return [None] * len(batched_inputs), None
        instance_weights, mask_weights = instance_weights.cpu(), mask_weights.cpu()
        if lcl_instances is None:
            lcl_instances = self._lcl_instances(
                batched_inputs,
                [x["view1"]["instances"] for x in batched_inputs],
                [x["view2"]["instances"] for x in batched_inputs],
            )[0]
        sampled, masks, occurrences = [], [], {}
        for i, (x, inst, size) in enumerate(zip(batched_inputs, lcl_instances, image_sizes)):
            key = _image_key(x, i, len(batched_inputs))
            occurrences[key] = occurrences.get(key, -1) + 1  # an image repeated in the batch
            generator = torch.Generator().manual_seed(
                _mix_seed(self.seed, iteration, key, occurrences[key])
            )
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
                    tuple(size),
                    self.mask_patch_size,
                    self.mask_ratio,
                    boxes,
                    box_weights,
                    self.mask_box_guided,
                    generator=generator,
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
    """A 63-bit seed from integers (SplitMix64 finaliser over them): neighbouring keys give
    unrelated streams."""
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

    parts = {k: d[k].ENABLED for k in ("HCL", "LCL", "AR", "SR", "RPN", "DET", "DECOR")}
    if not any(parts.values()) and not d.EXTRA_HEADS:
        fail(
            "MODEL.DRCL2.{HCL,LCL,AR,SR,RPN,DET,DECOR}.ENABLED",
            parts,
            "every part is off and MODEL.DRCL2.EXTRA_HEADS is empty; enable at least one head.",
        )
    for key in (
        "HCL.WEIGHT",
        "LCL.WEIGHT",
        "LCL.SUP_WEIGHT",
        "AR.WEIGHT",
        "SR.WEIGHT",
        "RPN.WEIGHT",
        "DET.WEIGHT",
        "DECOR.WEIGHT",
        "AR.VISIBLE_WEIGHT",
        "SR.VISIBLE_WEIGHT",
    ):
        group, name = key.split(".")
        value = d[group][name]
        if not (value >= 0 and math.isfinite(value)):
            fail(f"MODEL.DRCL2.{key}", value, "must be a finite number >= 0.")
    if not 0.0 <= d.BASE_MOMENTUM <= 1.0:
        fail("MODEL.DRCL2.BASE_MOMENTUM", d.BASE_MOMENTUM, "must lie in [0, 1].")
    if d.MASK.ONLINE_VIEW not in ONLINE_VIEWS:
        fail("MODEL.DRCL2.MASK.ONLINE_VIEW", d.MASK.ONLINE_VIEW, f"must be one of {ONLINE_VIEWS}.")
    if d.RPN.TARGETS not in RPN_TARGETS:
        fail("MODEL.DRCL2.RPN.TARGETS", d.RPN.TARGETS, f"must be one of {RPN_TARGETS}.")
    if d.DET.ENABLED and not d.RPN.ENABLED:
        fail(
            "MODEL.DRCL2.DET.ENABLED",
            True,
            "the supervised detection head trains on the RPN's proposals: set "
            "MODEL.DRCL2.RPN.ENABLED True.",
        )
    if d.LCL.LOSS not in LCL_LOSSES:
        fail("MODEL.DRCL2.LCL.LOSS", d.LCL.LOSS, f"must be one of {LCL_LOSSES}.")
    if int(d.LCL.MEMORY_PER_CLASS) != d.LCL.MEMORY_PER_CLASS or d.LCL.MEMORY_PER_CLASS < 0:
        fail(
            "MODEL.DRCL2.LCL.MEMORY_PER_CLASS",
            d.LCL.MEMORY_PER_CLASS,
            "must be an integer >= 0 (0: no memory).",
        )
    if not 0.0 <= d.LCL.BACKBONE_GRAD <= 1.0:
        fail("MODEL.DRCL2.LCL.BACKBONE_GRAD", d.LCL.BACKBONE_GRAD, "must lie in [0, 1].")
    if d.HCL.LOSS not in HCL_LOSSES:
        fail("MODEL.DRCL2.HCL.LOSS", d.HCL.LOSS, f"must be one of {HCL_LOSSES}.")
    for key in ("HCL.TEMPERATURE", "LCL.TEMPERATURE", "LCL.INST_TEMPERATURE"):
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
                "MODEL.LOAD_PROPOSALS",
                cfg.MODEL.LOAD_PROPOSALS,
                "MODEL.DRCL2.LCL.BOX_SOURCE 'proposals' reads precomputed proposals: set it True "
                "and DATASETS.PROPOSAL_FILES_TRAIN to one file per training set (python -m "
                "drcl2.tools.dump_proposals writes them).",
            )
        if len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) != len(cfg.DATASETS.TRAIN):
            fail(
                "DATASETS.PROPOSAL_FILES_TRAIN",
                tuple(cfg.DATASETS.PROPOSAL_FILES_TRAIN),
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
        fail(
            "MODEL.DRCL2.HEAD_NORM",
            d.HEAD_NORM,
            f"must be one of {norms} (detectron2 get_norm names).",
        )
    for key in ("MLP_HIDDEN_DIM", "MLP_OUT_DIM"):
        if d[key] < 1:
            fail(f"MODEL.DRCL2.{key}", d[key], "must be >= 1.")
    if not set(d.DRB.APPLY_TO) <= set(DRB_TERMS) or len(set(d.DRB.APPLY_TO)) != len(d.DRB.APPLY_TO):
        fail(
            "MODEL.DRCL2.DRB.APPLY_TO",
            d.DRB.APPLY_TO,
            f"must list distinct terms among {DRB_TERMS}.",
        )
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
        fail(
            "SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, "DRCL2's momentum and DRB schedules need >= 1."
        )
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 1:
        fail("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "must be >= 1.")
    if len(cfg.DATASETS.TEST):
        fail(
            "DATASETS.TEST",
            tuple(cfg.DATASETS.TEST),
            "DRCL2 pre-training has no inference, so nothing to evaluate (the run would train, "
            "then fail in evaluation and skip the export). Set DATASETS.TEST to (); fine-tune "
            "the exported weights and evaluate the fine-tuned detector.",
        )


def check_feature_levels(cfg, levels) -> None:
    """Raise ValueError when an enabled part reads a level the backbone does not produce."""
    d = cfg.MODEL.DRCL2
    for key, names in (
        ("HCL.IN_FEATURES", d.HCL.IN_FEATURES),
        ("SR.IN_FEATURES", d.SR.IN_FEATURES),
        ("AR.IN_FEATURE", [d.AR.IN_FEATURE]),
    ):
        group = key.split(".")[0]
        if d[group].ENABLED and (not names or not set(names) <= set(levels)):
            raise ValueError(
                f"MODEL.DRCL2.{key} = {names!r}: must name backbone outputs among {sorted(levels)}."
            )
