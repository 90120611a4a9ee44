"""
Pretext tasks of DRCL2 as registered heads: the registry, the base class and the step context.

A pretext head is one loss of 2DRCL pre-training (HCL, LCL, AR, SR, the RPN term, or a task of your
own). It says what it needs (online feature levels, target features of which views, the drawn
instances, the masked view), which modules it brings (built in ``from_config``; the model owns
them, under the names the head gives them, so their state-dict names are flat and stable) and
which of those the EMA target network follows. At every training step :class:`DRCL2` hands each
enabled head one :class:`StepContext` and collects its losses.

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

        def online_modules(self):
            return {"my_proj": self.proj}

        def target_modules(self):
            return {"my_proj": "my_proj"}

        def losses(self, ctx, normalizers):
            ...  # ctx.module("my_proj"), ctx.online1["p3"], ctx.target2["p3"],
                 ctx.target_module("my_proj")
            return {"loss_my": ...}

    cfg.MODEL.DRCL2.EXTRA_HEADS = ["MyHead"]
"""

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
]

DRCL2_HEAD_REGISTRY = Registry("DRCL2_HEAD")
DRCL2_HEAD_REGISTRY.__doc__ = """
Registry for DRCL2's pretext heads (:class:`PretextHead` subclasses). Each is built with
``HEAD(cfg, input_shape)`` (``@configurable``), ``input_shape`` being the backbone's output shapes.
"""

# The built-in heads, in build order (their modules are created in this order, so a seed gives the
# same initial weights as before the heads were split out), with the switch that enables each.
BUILTIN_HEADS = (
    ("RPN", "RPNLossHead"),
    ("DET", "SupervisedDetectionHead"),
    ("HCL", "HolisticContrastiveHead"),
    ("LCL", "LocalContrastiveHead"),
    ("AR", "AppearanceReconstructionHead"),
    ("SR", "SemanticReconstructionHead"),
    ("DECOR", "FeatureDecorrelationHead"),
)


@dataclass
class StepContext:
    """
    What one training step hands every head. Shapes: N images per process, (H, W) the padded size.

    Attributes:
        model: the DRCL2 model (its ``symmetric`` flag, ``pixel_mean`` / ``pixel_std``, strides).
        x1: Tensor[N, 3, H, W], view 1 normalised and padded (unmasked).
        image_sizes1, image_sizes2: N (h, w) of the views without padding.
        padded_size: (H, W).
        instances1, instances2: N Instances(gt_boxes, gt_classes) of the annotated boxes that
            survive both views (rows aligned: row i of v1 and v2 is the same object).
        targets1: N Instances(gt_boxes, gt_classes[, gt_masks]) of the annotated boxes that survive
            view 1 alone (detectron2's rule): the detection targets of view 1 (RPN, DET), or None
            when the inputs carry none.
        boxes1, boxes2: N Instances(gt_boxes, gt_classes) LCL draws from (annotations or
            proposals, ``LCL.BOX_SOURCE``; class -1: unlabelled), rows aligned across the views.
        sampled: N LongTensor[K_i], the drawn rows of ``boxes1`` / ``boxes2``, or N None.
        class_weights: DRB term ("instances", "sup", "masking") -> Tensor[C], w_c(lambda) or 1.
        masked: BoolTensor[N, H, W], masked pixels of x1 inside the images (all False without
            masking); valid: BoolTensor[N, H, W], pixels inside the images.
        targets1: see above.
        image_counts, instance_counts: images / drawn instances of every rank (rank order).
        online1, online2: level -> Tensor[N, C, H_l, W_l], online features of view 1 and of view 2
            (``None`` unless the model is symmetric). View 1 is unmasked unless the model's
            ``MASK.ONLINE_VIEW`` is "all" (then every head sees the masked view, 2DRCL v1).
        online_masked: the online features of the masked view 1, which the heads with
            ``masks_input`` (AR, SR) read; ``online1`` itself when nothing is masked.
        target1, target2: the same from the target backbone, for the views some head asked for
            (else None); no gradient.
        state: per-step scratch of the heads (e.g. masks computed in ``counts`` for ``losses``).
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
    state: Dict[str, Any] = field(default_factory=dict)
    skipped: List["PretextHead"] = field(default_factory=list)

    def module(self, name: str) -> nn.Module:
        """The model's online module ``name`` (as a head declared it in ``online_modules``)."""
        return getattr(self.model, name)

    def target_module(self, name: str) -> nn.Module:
        """The target network's copy ``name`` (as a head declared it in ``target_modules``)."""
        return self.model.target_network[name]

    def skip(self, head: "PretextHead") -> None:
        """
        ``head`` read none of its levels this step (e.g. too few instances): the levels only it
        reads join the graph with a zero weight (DDP needs a gradient for every parameter).
        """
        self.skipped.append(head)


class PretextHead:
    """
    Base class of a pretext head. Subclasses take plain keyword arguments (``@configurable``),
    build them in ``from_config(cls, cfg, input_shape)``, and implement :meth:`losses`.

    Declarations (constructor arguments of this base class):
        in_features: the online feature levels the head reads.
        target_views: which views' target-backbone features it reads: a subset of (1, 2).
        needs_instances: it uses the K drawn instances (``ctx.sampled``).
        masks_input: the head reads the online features of the masked view 1
            (``ctx.online_masked``; the reconstruction heads); the others read view 1 unmasked.
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str] = (),
        target_views: Sequence[int] = (),
        needs_instances: bool = False,
        masks_input: bool = False,
    ):
        if not set(target_views) <= {1, 2}:
            raise ValueError(
                f"{type(self).__name__}: target_views must be among (1, 2); got {target_views}."
            )
        self.in_features = list(in_features)
        self.target_views = tuple(target_views)
        self.needs_instances = needs_instances
        self.masks_input = masks_input

    @property
    def name(self) -> str:
        return type(self).__name__

    def online_modules(self) -> Dict[str, nn.Module]:
        """Model attribute name -> module: the trainable modules the head brings (the model owns
        them)."""
        return {}

    def target_modules(self) -> Dict[str, str]:
        """
        Target-network name -> dotted path of the online module it follows (e.g.
        ``{"box_head": "roi_heads.box_head"}``): the EMA copies this head reads. The target
        backbone is there whenever a head has ``target_views``.
        """
        return {}

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

    def __repr__(self):
        return f"{self.name}(in_features={self.in_features}, target_views={self.target_views})"


def build_pretext_heads(cfg, input_shape: Dict[str, ShapeSpec]) -> List[PretextHead]:
    """
    The heads enabled by ``cfg``: the built-in ones switched on by ``MODEL.DRCL2.<PART>.ENABLED``
    (in :data:`BUILTIN_HEADS` order), then ``MODEL.DRCL2.EXTRA_HEADS`` (registered names).
    """
    d = cfg.MODEL.DRCL2
    names = [name for part, name in BUILTIN_HEADS if d[part].ENABLED] + list(d.EXTRA_HEADS)
    heads = []
    for name in names:
        try:
            head_class = DRCL2_HEAD_REGISTRY.get(name)
        except KeyError as e:
            raise ValueError(
                f"MODEL.DRCL2.EXTRA_HEADS: {name!r} is not a registered pretext head "
                f"(registered: {sorted(k for k, _ in DRCL2_HEAD_REGISTRY)}). Register it with "
                "@DRCL2_HEAD_REGISTRY.register() and import its module before building the model."
            ) from e
        heads.append(head_class(cfg, input_shape))
    return heads


def feature_channels(input_shape: Dict[str, ShapeSpec]) -> int:
    """The channel count shared by every backbone output (FPN); ValueError if they differ."""
    channels = {s.channels for s in input_shape.values()}
    if len(channels) != 1:
        raise ValueError(f"DRCL2 needs one channel count on all backbone outputs; got {channels}.")
    return channels.pop()
