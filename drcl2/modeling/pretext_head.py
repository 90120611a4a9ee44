"""
The pretext heads of 2DRCL pre-training: the registry, the base class and the step context.

:class:`DRCL2` owns the detector (``backbone``, ``proposal_generator``, ``roi_heads``, as
detectron2's ``GeneralizedRCNN`` does) and trains it with detectron2's losses on view 1; a pretext
head adds one self-supervised loss (HCL, LCL, AR, SR, DECOR, or a task of your own). A head is an
``nn.Module`` holding only its own layers; it says what it reads (online feature levels, the target
backbone's features of which views, the drawn instances, the masked view) and which of its modules
the EMA target network follows. At every training step the model hands each head one
:class:`StepContext` and collects its losses; heads do not depend on each other, so their order
does not matter.

Add a task by registering one class and naming it in the config::

    @DRCL2_HEAD_REGISTRY.register()
    class MyHead(PretextHead):
        @configurable
        def __init__(self, *, proj, weight):
            super().__init__(in_features=("p3",), target_views=(2,))
            self.proj, self.weight = proj, weight

        @classmethod
        def from_config(cls, cfg, input_shape):
            return {"proj": nn.Linear(input_shape["p3"].channels, 64), "weight": 1.0}

        def target_modules(self):
            return ("proj",)  # the EMA target network keeps a copy: ctx.target(self, "proj")

        def losses(self, ctx, normalizers):
            ...  # self.proj, ctx.online1["p3"], ctx.target2["p3"], ctx.target(self, "proj")
            return {"loss_my": ...}

    cfg.MODEL.DRCL2.EXTRA_HEADS = ["MyHead"]
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Instances
from detectron2.utils.registry import Registry
from torch import nn

__all__ = [
    "DRCL2_HEAD_REGISTRY",
    "PretextHead",
    "StepContext",
    "build_pretext_heads",
    "BUILTIN_HEADS",
    "feature_channels",
    "check_weights",
    "check_levels",
]

DRCL2_HEAD_REGISTRY = Registry("DRCL2_HEAD")
DRCL2_HEAD_REGISTRY.__doc__ = """
Registry for DRCL2's pretext heads (:class:`PretextHead` subclasses). Each is built with
``HEAD(cfg, input_shape)`` (``@configurable``), ``input_shape`` being the backbone's output shapes.
"""

# The built-in heads: their key in DRCL2.heads, the config node that switches each on, its class.
BUILTIN_HEADS = (
    ("hcl", "HCL", "HolisticContrastiveHead"),
    ("lcl", "LCL", "LocalContrastiveHead"),
    ("ar", "AR", "AppearanceReconstructionHead"),
    ("sr", "SR", "SemanticReconstructionHead"),
    ("decor", "DECOR", "FeatureDecorrelationHead"),
)


@dataclass
class StepContext:
    """
    What one training step hands every head. Shapes: N images per process, (H, W) the padded size.

    Attributes:
        model: the DRCL2 model (its ``symmetric`` flag, ``pixel_std``, ``roi_heads``).
        x1: Tensor[N, 3, H, W], view 1 normalised and padded (unmasked).
        image_sizes1, image_sizes2: N (h, w) of the views without padding.
        padded_size: (H, W).
        instances1, instances2: N Instances(gt_boxes, gt_classes) of the annotated boxes that
            survive both views (rows aligned: row i of v1 and v2 is the same object).
        targets1: N Instances(gt_boxes, gt_classes[, gt_masks]) of the annotated boxes that survive
            view 1 alone (detectron2's rule): the detection targets of view 1, or None when the
            inputs carry none.
        boxes1, boxes2: N Instances(gt_boxes, gt_classes) LCL draws from (annotations or
            proposals, ``LCL.BOX_SOURCE``; class -1: unlabelled), rows aligned across the views.
        sampled: N LongTensor[K_i], the drawn rows of ``boxes1`` / ``boxes2``, or N None.
        class_weights: DRB term ("instances", "sup", "masking") -> Tensor[C], w_c(lambda) or 1.
        masked: BoolTensor[N, H, W], masked pixels of x1 inside the images (all False without
            masking); valid: BoolTensor[N, H, W], pixels inside the images.
        image_counts, instance_counts: images / drawn instances of every rank (rank order).
        online1, online2: level -> Tensor[N, C, H_l, W_l], online features of view 1 and of view 2
            (``None`` unless the model is symmetric). View 1 is unmasked unless the model's
            ``MASK.ONLINE_VIEW`` is "all" (then every head sees the masked view, 2DRCL v1).
        online_masked: the online features of the masked view 1, which the heads with
            ``masks_input`` (AR, SR) read; ``online1`` itself when nothing is masked.
        target1, target2: the same from the target backbone, for the views some head asked for
            (else None); no gradient.
        proposals: N Instances(proposal_boxes, objectness_logits), the RPN's proposals of view 1
            when the detection losses are on (else None).
        scratch: per-head scratch of the step, by head key (e.g. what ``counts`` computed for
            ``losses``).
        skipped: the heads that read none of their levels this step (:meth:`skip`).
    """

    model: nn.Module
    x1: torch.Tensor
    image_sizes1: List[Tuple[int, int]]
    image_sizes2: List[Tuple[int, int]]
    padded_size: Tuple[int, int]
    instances1: List[Instances]
    instances2: List[Instances]
    boxes1: List[Instances]
    boxes2: List[Instances]
    sampled: List[Optional[torch.Tensor]]
    class_weights: Dict[str, torch.Tensor]
    masked: torch.Tensor
    valid: torch.Tensor
    targets1: Optional[List[Instances]] = None
    image_counts: List[int] = field(default_factory=list)
    instance_counts: List[int] = field(default_factory=list)
    online1: Optional[Dict[str, torch.Tensor]] = None
    online2: Optional[Dict[str, torch.Tensor]] = None
    online_masked: Optional[Dict[str, torch.Tensor]] = None
    target1: Optional[Dict[str, torch.Tensor]] = None
    target2: Optional[Dict[str, torch.Tensor]] = None
    proposals: Optional[List[Instances]] = None
    scratch: Dict[str, Any] = field(default_factory=dict)
    skipped: List["PretextHead"] = field(default_factory=list)

    def target(self, head: "PretextHead", name: str) -> nn.Module:
        """The target network's copy of ``head``'s module ``name`` (one of its
        :meth:`~PretextHead.target_modules`)."""
        return self.model.target_network[f"{head.key}_{name}"]

    @property
    def target_box_head(self) -> nn.Module:
        """The target network's copy of the model's box head (``roi_heads.box_head``)."""
        return self.model.target_network["box_head"]

    def skip(self, head: "PretextHead") -> None:
        """
        ``head`` read none of its levels this step (e.g. too few instances): the levels only it
        reads join the graph with a zero weight (DDP needs a gradient for every parameter).
        """
        self.skipped.append(head)


class PretextHead(nn.Module):
    """
    Base class of a pretext head: an ``nn.Module`` with the head's own layers. Subclasses take plain
    keyword arguments (``@configurable``), build them in ``from_config(cls, cfg, input_shape)``
    (validating their own config keys there) and implement :meth:`losses`.

    Declarations (constructor arguments of this base class):
        in_features: the online feature levels the head reads.
        target_views: which views' target-backbone features it reads: a subset of (1, 2).
        needs_instances: it uses the K drawn instances (``ctx.sampled``).
        needs_box_features: it pools boxes with the model's ``roi_heads`` (box pooler and box
            head; the model then builds them even without the detection losses) and reads the
            target network's box head (``ctx.target_box_head``).
        masks_input: the head reads the online features of the masked view 1
            (``ctx.online_masked``; the reconstruction heads); the others read view 1 unmasked.
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str] = (),
        target_views: Sequence[int] = (),
        needs_instances: bool = False,
        needs_box_features: bool = False,
        masks_input: bool = False,
    ):
        super().__init__()
        if not set(target_views) <= {1, 2}:
            raise ValueError(
                f"{type(self).__name__}: target_views must be among (1, 2); got {target_views}."
            )
        self.in_features = list(in_features)
        self.target_views = tuple(target_views)
        self.needs_instances = needs_instances
        self.needs_box_features = needs_box_features
        self.masks_input = masks_input
        self.key = type(self).__name__  # its key in DRCL2.heads (set by the model)

    @property
    def name(self) -> str:
        return type(self).__name__

    def target_modules(self) -> Sequence[str]:
        """Names of the head's own modules that the EMA target network follows (e.g. its
        projector); the target backbone is there whenever a head has ``target_views``."""
        return ()

    def check(self, strides: Dict[str, int], size_divisibility: int) -> None:
        """Raise ValueError when the head cannot work with the backbone (levels, strides)."""
        missing = [f for f in self.in_features if f not in strides]
        if missing:
            raise ValueError(
                f"{self.name} reads levels {missing} that the backbone lacks ({sorted(strides)})."
            )

    def counts(self, ctx: StepContext) -> List[torch.Tensor]:
        """
        This rank's sums (0-dim Tensors) that the head normalises its losses by; the model
        all-gathers every head's in one collective and hands :meth:`losses` their DDP normalisers
        (global sum / world size). Called before any feature is computed.
        """
        return []

    def losses(self, ctx: StepContext, normalizers: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            ctx: the step.
            normalizers: Tensor[P], the DDP normalisers of the P sums :meth:`counts` returned.

        Returns:
            loss name -> weighted scalar Tensor. Every trainable parameter of the head must
            receive a gradient (a zero one if the term is empty).
        """
        raise NotImplementedError

    def extra_repr(self):
        return f"in_features={self.in_features}, target_views={self.target_views}"


def build_pretext_heads(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, PretextHead]:
    """
    The heads enabled by ``cfg``, key -> head: the built-in ones switched on by
    ``MODEL.DRCL2.<PART>.ENABLED`` (in :data:`BUILTIN_HEADS` order, which is also the order in
    which their layers are initialised), then ``MODEL.DRCL2.EXTRA_HEADS`` (registered names, their
    key the name).
    """
    d = cfg.MODEL.DRCL2
    names = [(key, name) for key, part, name in BUILTIN_HEADS if d[part].ENABLED]
    names += [(name, name) for name in d.EXTRA_HEADS]
    heads = {}
    for key, name in names:
        try:
            head_class = DRCL2_HEAD_REGISTRY.get(name)
        except KeyError as e:
            raise ValueError(
                f"MODEL.DRCL2.EXTRA_HEADS: {name!r} is not a registered pretext head "
                f"(registered: {sorted(k for k, _ in DRCL2_HEAD_REGISTRY)}). Register it with "
                "@DRCL2_HEAD_REGISTRY.register() and import its module before building the model."
            ) from e
        if key in heads:
            raise ValueError(f"MODEL.DRCL2.EXTRA_HEADS: {name!r} is listed twice.")
        heads[key] = head_class(cfg, input_shape)
        heads[key].key = key
    return heads


def feature_channels(input_shape: Dict[str, ShapeSpec]) -> int:
    """The channel count shared by every backbone output (FPN); ValueError if they differ."""
    channels = {s.channels for s in input_shape.values()}
    if len(channels) != 1:
        raise ValueError(f"DRCL2 needs one channel count on all backbone outputs; got {channels}.")
    return channels.pop()


def check_weights(node, prefix: str, *names: str) -> None:
    """Raise ValueError naming ``<prefix>.<name>`` for a weight of a config node that is not a
    finite number >= 0 (e.g. ``check_weights(cfg.MODEL.DRCL2.AR, "MODEL.DRCL2.AR", "WEIGHT")``)."""
    for name in names:
        value = node[name]
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{prefix}.{name} = {value!r}: must be a finite number >= 0.")


def check_levels(key: str, names: Sequence[str], input_shape: Dict[str, ShapeSpec]) -> None:
    """Raise ValueError naming ``key`` unless ``names`` are backbone outputs (at least one)."""
    if not names or not set(names) <= set(input_shape):
        raise ValueError(
            f"{key} = {list(names)!r}: must name backbone outputs among {sorted(input_shape)}."
        )
