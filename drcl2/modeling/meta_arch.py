"""The 2DRCL pre-training meta-architecture (docs/method.md): MODEL.META_ARCHITECTURE "DRCL2"."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
)
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import ImageList
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.profiler import record_function

from ..data.rebalance import RebalanceSchedule, class_weights
from .blocks import BoxFeatureHead
from .distributed import exchange_step_counts
from .draws import draw_step, lcl_boxes
from .ema import TargetNetworkMixin, cosine_momentum
from .pretext_head import PretextHead, StepContext, build_pretext_heads, feature_channels
from .rpn_losses import rpn_losses_only

__all__ = ["DRCL2", "BOX_SOURCES", "DRB_TERMS", "ONLINE_VIEWS", "RPN_TARGETS"]

BOX_SOURCES = ("gt", "proposals")  # MODEL.DRCL2.LCL.BOX_SOURCE
DRB_TERMS = ("instances", "sup", "masking")  # where the class weights w_c(lambda) act in the model
ONLINE_VIEWS = ("reconstruction", "all")  # MODEL.DRCL2.MASK.ONLINE_VIEW: who reads the masked view
RPN_TARGETS = ("view", "pairs")  # MODEL.DRCL2.RPN.TARGETS


@META_ARCH_REGISTRY.register()
class DRCL2(TargetNetworkMixin, nn.Module):
    """
    2DRCL pre-training. The model owns a detector, as detectron2's ``GeneralizedRCNN`` does
    (``backbone``, ``proposal_generator``, ``roi_heads``), trained with detectron2's losses on view
    1 (``loss_rpn_*``; ``loss_cls``, ``loss_box_reg``, ``loss_mask``), and the pretext heads of
    ``heads`` (:mod:`drcl2.modeling.pretext_head`: HCL, LCL, AR, SR, ...) against an EMA target
    network (``target_network``, :class:`TargetNetworkMixin`). The module names are detectron2's,
    so the export loads into a stock ``GeneralizedRCNN`` (:mod:`drcl2.export`).

    Input: N dicts from :class:`drcl2.data.TwoViewDatasetMapper`: ``"view1"`` and ``"view2"``
    (``"image"``: Tensor[3, H, W], ``"instances"``: Instances(gt_boxes, gt_classes, ...) with rows
    aligned across the views; view 1 also its detection ``"targets"``; with ``box_source
    "proposals"`` both their ``"proposals"``) and ``"image_id"``. Output (training only): the
    losses, each weighted by its term's ``WEIGHT``: the detector's ``loss_rpn_cls``,
    ``loss_rpn_loc`` and (with DET) ``loss_cls``, ``loss_box_reg``, ``loss_mask``; the enabled
    heads' ``loss_hcl``, ``loss_lcl_inst``, ``loss_lcl_sup``, ``loss_ar``, ``loss_sr``,
    ``loss_decor`` (and those of ``EXTRA_HEADS``).

    Any trainer can drive it: the model moves its target network itself once per new iteration
    (the :class:`EventStorage`'s, else an internal counter; a resumed run is exact), and draws
    instances and masked patches per image from ``(seed, iteration, image_id)``
    (:mod:`drcl2.modeling.draws`). With DRB, hand over the rebalancing schedule (the sampler's,
    ``rebalance_schedule``) and the class statistics (:meth:`set_class_statistics`) before
    training; drcl2's Trainer does both. With several processes every loss is the mean over the
    global batch, and every trainable parameter gets a gradient at every step (DDP runs with
    ``find_unused_parameters=False``). Pooling, norms and losses run in float32 or wider.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        heads: Dict[str, PretextHead],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_classes: int,
        max_iter: int,
        proposal_generator: Optional[nn.Module] = None,
        roi_heads: Optional[nn.Module] = None,
        detection: bool = True,
        rpn_targets: str = "view",
        rpn_weight: float = 1.0,
        detection_weight: float = 1.0,
        base_momentum: float = 0.99,
        symmetric: bool = False,
        num_instances: int = 8,
        box_source: str = "gt",
        drb: bool = False,
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
            heads: key -> pretext head (:class:`PretextHead`).
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            num_classes: C, the classes of the training set.
            max_iter: K, the length of the schedule (momentum; DRB progress).
            proposal_generator: detectron2's RPN, trained on view 1 (None: no RPN term).
            roi_heads: detectron2's ROI heads (trained with ``detection``), or a
                :class:`BoxFeatureHead` for the heads that pool boxes (LCL); None if none does.
            detection: train ``roi_heads`` with detectron2's losses on the RPN's proposals.
            rpn_targets: the RPN's targets: "view" (view 1's own objects) or "pairs" (2DRCL v1:
                the objects that survive both views).
            rpn_weight, detection_weight: weights of the RPN's and the ROI heads' losses.
            base_momentum: m0 of the cosine momentum schedule.
            symmetric: the heads also train the swapped pair (online x2 vs target x1).
            num_instances: K instances drawn per image (LCL, box-guided masking).
            box_source: where the drawn boxes come from (:data:`BOX_SOURCES`).
            drb: class weights w_c(lambda) = (r_c^ins) ** lambda where ``drb_apply_to`` says
                (:data:`DRB_TERMS`); elsewhere, and without DRB, 1.
            repeat_thresh: t of the class repeat factors (``DATALOADER.DRCL2.REPEAT_THRESHOLD``).
            mask_patch_size, mask_ratio, mask_box_guided: patch masking of x1 (used when a head
                has ``masks_input``: AR, SR).
            mask_online_view: "reconstruction": only the heads with ``masks_input`` read the masked
                view 1; "all": the detector and every head read it (2DRCL v1).
            seed: base seed of the per-image draws; None: drawn from torch's generator now.
        """
        super().__init__()
        for name, value, choices in (
            ("box_source", [box_source], BOX_SOURCES),
            ("mask_online_view", [mask_online_view], ONLINE_VIEWS),
            ("rpn_targets", [rpn_targets], RPN_TARGETS),
            ("drb_apply_to", drb_apply_to, DRB_TERMS),
        ):
            if not set(value) <= set(choices):
                raise ValueError(f"DRCL2: {name} must be among {choices}; got {value!r}.")
        if not heads and proposal_generator is None:
            raise ValueError("DRCL2: give at least one pretext head or the RPN.")
        if detection and (proposal_generator is None or roi_heads is None):
            raise ValueError(
                "DRCL2: the detection losses need the RPN (its proposals) and ROI heads."
            )
        if roi_heads is None and any(h.needs_box_features for h in heads.values()):
            raise ValueError("DRCL2: a head pools boxes (needs_box_features): give roi_heads.")
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.heads = nn.ModuleDict(heads)
        # Strides of the levels, from the backbone (never inferred from feature sizes).
        self._strides = {name: shape.stride for name, shape in backbone.output_shape().items()}
        for head in self.heads.values():
            head.check(self._strides, backbone.size_divisibility)

        self.num_classes, self.max_iter, self.base_momentum = num_classes, max_iter, base_momentum
        self.detection, self.rpn_targets = detection, rpn_targets
        self.rpn_weight, self.detection_weight = rpn_weight, detection_weight
        self.symmetric, self.num_instances, self.box_source = symmetric, num_instances, box_source
        self.drb, self.drb_apply_to, self.repeat_thresh = drb, tuple(drb_apply_to), repeat_thresh
        self.rebalance_schedule: Optional[RebalanceSchedule] = None  # handed over (Trainer)
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.mask_box_guided, self.mask_online_view = mask_box_guided, mask_online_view
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)

        # Target network: EMA copies of the backbone (when a head reads target features), of the
        # box head (for the heads that pool boxes) and of the modules each head names.
        paths = {"backbone": "backbone"} if any(h.target_views for h in heads.values()) else {}
        for key, head in self.heads.items():
            paths.update({"box_head": "roi_heads.box_head"} if head.needs_box_features else {})
            paths.update({f"{key}_{name}": f"heads.{key}.{name}" for name in head.target_modules()})
        self.build_target_network(paths)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # r_c^ins of the training set (w_c(lambda) = r_c^ins ** lambda); 1 until handed over.
        self.register_buffer("class_repeat_factors", torch.ones(num_classes))
        self.register_buffer("class_statistics_set", torch.tensor(False))

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DRCL2
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        feature_channels(shapes)
        # The detector first, then the heads: the order in which their layers are initialised.
        rpn = build_proposal_generator(cfg, shapes) if d.RPN.ENABLED else None
        roi_heads = build_roi_heads(cfg, shapes) if d.DET.ENABLED else None
        heads = build_pretext_heads(cfg, shapes)
        if roi_heads is None and any(h.needs_box_features for h in heads.values()):
            box = StandardROIHeads._init_box_head(cfg, shapes)  # RoIAlign and box head only
            roi_heads = BoxFeatureHead(
                **{k: box[k] for k in ("box_in_features", "box_pooler", "box_head")}
            )
        return dict(
            backbone=backbone, heads=heads, proposal_generator=rpn, roi_heads=roi_heads,
            detection=d.DET.ENABLED, rpn_targets=d.RPN.TARGETS, rpn_weight=d.RPN.WEIGHT,
            detection_weight=d.DET.WEIGHT, pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            max_iter=cfg.SOLVER.MAX_ITER, base_momentum=d.BASE_MOMENTUM, symmetric=d.SYMMETRIC,
            num_instances=d.LCL.NUM_INSTANCES, box_source=d.LCL.BOX_SOURCE, drb=d.DRB.ENABLED,
            drb_apply_to=tuple(d.DRB.APPLY_TO), repeat_thresh=cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD,
            mask_patch_size=d.MASK.PATCH_SIZE, mask_ratio=d.MASK.RATIO,
            mask_box_guided=d.MASK.BOX_GUIDED, mask_online_view=d.MASK.ONLINE_VIEW,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def needs_instances(self) -> bool:
        """Some head uses the drawn instances."""
        return any(h.needs_instances for h in self.heads.values())

    @property
    def masking_enabled(self) -> bool:
        """A reconstruction head (``masks_input``: AR, SR) reads the masked view."""
        return any(h.masks_input for h in self.heads.values()) and self.mask_ratio > 0

    def detector_levels(self) -> List[str]:
        """The levels the RPN and ROI heads read."""
        levels = list(self.proposal_generator.in_features) if self.proposal_generator else []
        if self.detection:
            levels += self.roi_heads.box_in_features
            levels += getattr(self.roi_heads, "mask_in_features", None) or []
        return list(dict.fromkeys(levels))

    # ---- DRB -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_class_statistics(self, dataset_dicts: List[dict]) -> None:
        """Hand the training set (detectron2 dicts, contiguous category ids) to the model: stores
        r_c^ins, from which the class weights ``w_c(lambda) = (r_c^ins) ** lambda`` follow."""
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
        """lambda at ``iteration`` and the class weights of each of :data:`DRB_TERMS`: w_c(lambda)
        for the terms of ``drb_apply_to``, 1 for the others (and for all without DRB)."""
        lam = self.rebalance_schedule.at(iteration) if self.drb else 0.0  # the sampler's lambda
        weights = self.class_weights_at(lam)
        ones = torch.ones_like(weights)
        return lam, {t: weights if t in self.drb_apply_to else ones for t in DRB_TERMS}

    # ---- one training step ---------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The weighted losses of the detector and every head on N dicts from
        :class:`TwoViewDatasetMapper`; with several processes, this rank's share (their average
        over ranks is the loss of the global batch)."""
        if not self.training:
            raise RuntimeError(
                "DRCL2 is a pre-training model and has no inference; export its weights with "
                "`python -m drcl2.tools.export_weights` and fine-tune / evaluate a GeneralizedRCNN."
            )
        if self.drb and (self.rebalance_schedule is None or not bool(self.class_statistics_set)):
            raise RuntimeError(
                "DRCL2: dynamic rebalancing is on (MODEL.DRCL2.DRB.ENABLED) but the model has no "
                "rebalancing schedule or class statistics. Hand them over once before training: "
                "model.rebalance_schedule = RebalanceSchedule.from_config(cfg) (the sampler's) and "
                "model.set_class_statistics(dataset_dicts); drcl2.engine.Trainer does both."
            )
        try:
            storage = get_event_storage()
            iteration = storage.iter
        except AssertionError:  # no trainer: each training forward is a new iteration
            storage, iteration = None, int(self.last_iteration) + 1
        with record_function("drcl2.ema"):
            self.start_iteration(iteration)
        if storage is not None:  # the momentum of this iteration's EMA step (applied at the next)
            momentum = cosine_momentum(self.base_momentum, iteration, self.max_iter)
            storage.put_scalar("drcl2/momentum", momentum, smoothing_hint=False)

        ctx, x2, masked_x1 = self._prepare(batched_inputs, iteration)
        heads = list(self.heads.values())
        head_sums = [head.counts(ctx) for head in heads]
        with record_function("drcl2.counts"):
            num_instances = sum(len(i) for i in ctx.sampled) if self.needs_instances else 0
            ctx.image_counts, ctx.instance_counts, normalizers = exchange_step_counts(
                len(ctx.x1), num_instances, head_sums, self.device
            )
        with record_function("drcl2.online_forward"):
            self._online_forward(ctx, x2, masked_x1)
        with record_function("drcl2.target_forward"):
            self._target_forward(ctx, x2)
        losses = self._detector_losses(ctx)
        for head, head_normalizers in zip(heads, normalizers):
            with record_function(f"drcl2.{head.key}"):
                head_losses = head.losses(ctx, head_normalizers)
            taken = set(head_losses) & set(losses)
            if taken:
                raise ValueError(
                    f"DRCL2: {head.name} returns losses {sorted(taken)} already taken."
                )
            losses.update(head_losses)
        return self._join_unread_levels(losses, ctx)

    def preprocess(self, batched_inputs: List[Dict]):
        """Both views of every image normalised and padded into one :class:`ImageList` of 2N images
        (v1 of all images, then v2; one padded size), and the Instances of v1 and of v2."""
        for i, x in enumerate(batched_inputs):
            if "view1" not in x or "view2" not in x:
                raise ValueError(
                    f"DRCL2 expects inputs from TwoViewDatasetMapper (keys 'view1', 'view2'); "
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
        if any(len(a) != len(b) for a, b in zip(instances[:N], instances[N:])):
            raise ValueError("DRCL2: the two views of an image must hold the same instances.")
        return images, instances[:N], instances[N:]

    def _draw(self, batched_inputs, boxes, image_sizes, padded_size, iteration, weights):
        """The step's instances and masked pixels of view 1 (:func:`draw_step`), on the device."""
        sampled, pixel_mask = draw_step(
            batched_inputs, boxes, image_sizes, padded_size, seed=self.seed, iteration=iteration,
            num_instances=self.num_instances, needs_instances=self.needs_instances,
            instance_weights=weights["instances"], mask_weights=weights["masking"],
            patch_size=self.mask_patch_size, box_guided=self.mask_box_guided,
            mask_ratio=self.mask_ratio if self.masking_enabled else 0.0,
        )  # fmt: skip
        sampled = [s.to(self.device) if s is not None else None for s in sampled]
        return sampled, (pixel_mask.to(self.device) if pixel_mask is not None else None)

    def _prepare(self, batched_inputs: List[Dict], iteration: int):
        """The step's inputs and draws: the :class:`StepContext` (features still to come), view 2
        and the masked view 1 (or None)."""
        images, instances1, instances2 = self.preprocess(batched_inputs)
        targets1 = None
        if all("targets" in x["view1"] for x in batched_inputs):
            targets1 = [x["view1"]["targets"].to(self.device) for x in batched_inputs]
        boxes1, boxes2 = (instances1, instances2)
        if self.box_source != "gt":
            boxes1, boxes2 = lcl_boxes(batched_inputs, self.box_source, self.device)
        N, sizes = len(batched_inputs), images.image_sizes
        padded = tuple(images.tensor.shape[-2:])
        x1, x2 = images.tensor[:N], images.tensor[N:]
        with record_function("drcl2.masking"):
            _, term_weights = self.term_weights_at(iteration)
            sampled, pixel_mask = self._draw(
                batched_inputs, boxes1, sizes[:N], padded, iteration, term_weights
            )
            valid = self._valid_pixels(sizes[:N], padded)
            masked = valid & pixel_mask if pixel_mask is not None else torch.zeros_like(valid)
            masked_x1 = x1 * (~pixel_mask)[:, None].to(x1.dtype) if pixel_mask is not None else None
        ctx = StepContext(
            model=self, x1=x1, image_sizes1=sizes[:N], image_sizes2=sizes[N:], padded_size=padded,
            instances1=instances1, instances2=instances2, boxes1=boxes1, boxes2=boxes2,
            sampled=sampled, class_weights=term_weights, masked=masked, valid=valid,
            targets1=targets1,
        )  # fmt: skip
        return ctx, x2, masked_x1

    def _valid_pixels(self, image_sizes, padded_size) -> torch.Tensor:
        """BoolTensor[N, H, W]: True inside each image, False on padding."""
        valid = torch.zeros((len(image_sizes), *padded_size), dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(image_sizes):
            valid[i, :h, :w] = True
        return valid

    def _online_forward(self, ctx: StepContext, x2: torch.Tensor, masked_x1) -> None:
        """One batched online forward: view 1; the masked view 1 for the reconstruction heads
        (``mask_online_view`` "all", or no reader of the unmasked view: the masked view alone);
        view 2 when symmetric."""
        N = len(ctx.x1)
        reads_unmasked = self.proposal_generator is not None or any(
            not h.masks_input for h in self.heads.values()
        )
        inputs, separate = [ctx.x1], False
        if masked_x1 is not None:
            if self.mask_online_view == "all" or not reads_unmasked:
                inputs = [masked_x1]
            else:
                inputs, separate = [ctx.x1, masked_x1], True
        inputs += [x2] if self.symmetric else []
        feats = self.backbone(torch.cat(inputs)) if len(inputs) > 1 else self.backbone(inputs[0])
        ctx.online1 = {k: v[:N] for k, v in feats.items()} if len(inputs) > 1 else feats
        ctx.online_masked = {k: v[N : 2 * N] for k, v in feats.items()} if separate else ctx.online1
        if self.symmetric:
            ctx.online2 = {k: v[-N:] for k, v in feats.items()}

    @torch.no_grad()
    def _target_forward(self, ctx: StepContext, x2: torch.Tensor) -> None:
        """One batched no-grad target forward over the views the heads read."""
        need_t1 = any(1 in h.target_views for h in self.heads.values())
        need_t2 = any(2 in h.target_views for h in self.heads.values())
        if need_t1 or need_t2:
            N = len(ctx.x1)
            feats = self.target_network["backbone"](
                torch.cat(([ctx.x1] if need_t1 else []) + ([x2] if need_t2 else []))
            )
            ctx.target1 = {k: v[:N] for k, v in feats.items()} if need_t1 else None
            ctx.target2 = {k: v[-N:] for k, v in feats.items()} if need_t2 else None

    def _detector_losses(self, ctx: StepContext) -> Dict[str, torch.Tensor]:
        """detectron2's RPN losses and, with ``detection``, ROI-head losses on view 1, each rescaled
        from this rank's per-image mean to the global one (the RPN's proposals go to the ROI heads
        through ``ctx.proposals``)."""
        if self.proposal_generator is None:
            return {}
        if self.rpn_targets == "view" or self.detection:
            if ctx.targets1 is None:
                raise ValueError(
                    "DRCL2: the RPN (MODEL.DRCL2.RPN.TARGETS 'view') and the detection losses "
                    "train on view 1's own 'targets'; build the inputs with TwoViewDatasetMapper."
                )
        targets = ctx.targets1 if self.rpn_targets == "view" else ctx.instances1
        per_image = comm.get_world_size() * len(ctx.x1) / sum(ctx.image_counts)
        with record_function("drcl2.rpn"):
            if self.detection:
                images = ImageList(ctx.x1, ctx.image_sizes1)
                ctx.proposals, rpn = self.proposal_generator(images, ctx.online1, targets)
            else:
                rpn = rpn_losses_only(self.proposal_generator, ctx.online1, targets)
        losses = {k: self.rpn_weight * per_image * v for k, v in rpn.items()}
        if self.detection:
            with record_function("drcl2.detection"):
                images = ImageList(ctx.x1, ctx.image_sizes1)
                _, det = self.roi_heads(images, ctx.online1, ctx.proposals, ctx.targets1)
            # the mask loss is a mean over this rank's foreground RoIs, as in detectron2's own
            # multi-GPU training; the box losses are per-image means, rescaled like the RPN's
            losses.update({k: self.detection_weight * per_image * v for k, v in det.items()})
        return losses

    def _join_unread_levels(self, losses, ctx: StepContext):
        """FPN levels nothing read this step (no head reads them, or only heads that skipped it)
        join the graph with a zero weight: DDP (find_unused_parameters=False) needs a gradient for
        every backbone parameter."""
        read = set(self.detector_levels())
        read |= {f for h in self.heads.values() if h not in ctx.skipped for f in h.in_features}
        unread = [f for f in self._strides if f not in read]
        if unread:
            first = next(iter(losses))
            losses[first] = losses[first] + sum(ctx.online1[f].sum() * 0.0 for f in unread)
        return losses
