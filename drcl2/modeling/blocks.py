"""
The building blocks of 2DRCL's heads (docs/method.md): projector / predictor MLPs, the box-feature
head (RoIAlign + box head) LCL pools with, the class memory of L_sup, the key queues of the InfoNCE
terms, the appearance-reconstruction
decoder and the semantic-reconstruction predictors. Plain ``nn.Module``s with typed arguments; the
pretext heads (hcl_head.py, lcl_head.py, reconstruction_heads.py) build them from the config.
"""

from typing import Dict, List

import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

from .losses import at_least_float32

__all__ = [
    "MLPHead",
    "AppearanceDecoder",
    "SemanticPredictors",
    "BoxFeatureHead",
    "box_features",
    "ClassMemory",
    "KeyQueue",
    "build_key_queue",
    "check_key_queue",
]


class MLPHead(nn.Module):
    """
    Linear - BN - ReLU - Linear (BYOL / SoCo projector and predictor).

    The BN is built with detectron2's :func:`get_norm` on a ``[N, C, 1, 1]`` view, so every norm it
    knows works: "BN", "SyncBN", "naiveSyncBN", "naiveSyncBN_N" (synchronised across ranks, works
    with zero-size inputs on some ranks), "" (none). It runs in float32 or wider (AMP-safe).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "naiveSyncBN_N"):
        """
        Args:
            in_dim, hidden_dim, out_dim: sizes of the input, hidden and output vectors.
            norm: the norm after the first Linear (see class doc).
        """
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=not norm)
        self.norm = get_norm(norm, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Tensor[N, in_dim].

        Returns:
            Tensor[N, out_dim].
        """
        x = self.fc1(x)
        if self.norm is not None:
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = self.norm(at_least_float32(x)[:, :, None, None]).flatten(1)
        return self.fc2(F.relu(x))


class BoxFeatureHead(nn.Module):
    """
    RoIAlign + box head: the ``box_pooler`` / ``box_head`` pair of detectron2's
    :class:`StandardROIHeads`, under the same attribute names, so that a DRCL2 model's
    ``roi_heads.box_head.*`` weights load into a fine-tuning ``GeneralizedRCNN`` unchanged.
    """

    def __init__(self, *, box_in_features: List[str], box_pooler: nn.Module, box_head: nn.Module):
        """
        Args:
            box_in_features: feature levels the pooler reads (``MODEL.ROI_HEADS.IN_FEATURES``).
            box_pooler: a detectron2 :class:`ROIPooler`.
            box_head: a detectron2 box head (e.g. ``FastRCNNConvFCHead``).
        """
        super().__init__()
        self.box_in_features = list(box_in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head

    def forward(self, features: Dict[str, torch.Tensor], boxes, box_head: nn.Module = None):
        """
        Args:
            features: level name -> Tensor[N, C, H_l, W_l].
            boxes: list of N :class:`Boxes` (image coordinates), one per image.
            box_head: run this box head instead of ``self.box_head`` (the target network's copy).

        Returns:
            Tensor[R, D]: the box-head feature of every box, images in order.
        """
        return box_features(self, features, boxes, box_head)


def box_features(
    roi_heads: nn.Module, features: Dict[str, torch.Tensor], boxes, box_head: nn.Module = None
):
    """
    The box-head feature of every box, with the ``box_pooler`` / ``box_head`` / ``box_in_features``
    of ``roi_heads`` (a :class:`BoxFeatureHead` or detectron2's ``StandardROIHeads``).

    Args:
        features: level name -> Tensor[N, C, H_l, W_l].
        boxes: list of N :class:`Boxes` (image coordinates), one per image.
        box_head: run this box head instead of ``roi_heads.box_head`` (the target network's copy).

    Returns:
        Tensor[R, D], images in order.
    """
    pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
    return (box_head if box_head is not None else roi_heads.box_head)(pooled)


class ClassMemory(nn.Module):
    """
    The last ``size`` embeddings of every class, first in, first out (buffers: saved in checkpoints,
    so a resumed run goes on with the same memory). Used by L_sup so that an instance has positives
    of its class when the class appears once in a batch. Update it with the same embeddings on
    every process (e.g. all-gathered ones), so that every process keeps the same memory.
    """

    def __init__(self, num_classes: int, size: int, dim: int):
        """
        Args:
            num_classes: C; size: M, embeddings kept per class; dim: D.
        """
        super().__init__()
        self.size = size
        self.register_buffer("embeddings", torch.zeros(num_classes, size, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.int64))  # valid entries
        self.register_buffer("next", torch.zeros(num_classes, dtype=torch.int64))  # where to write

    def entries(self):
        """Tensor[E, D] of every valid entry and LongTensor[E] of their classes."""
        valid = (
            torch.arange(self.size, device=self.filled.device)[None, :] < self.filled[:, None]
        )  # [C, M]
        classes = torch.arange(len(self.filled), device=valid.device)[:, None].expand_as(valid)
        return self.embeddings[valid], classes[valid]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, classes: torch.Tensor) -> None:
        """
        Add ``embeddings`` (Tensor[R, D], l2-normalised here) of ``classes`` (LongTensor[R], in
        [0, C)), in row order: a class's oldest entries are replaced once it holds ``size``.
        """
        z = F.normalize(at_least_float32(embeddings.detach()), dim=1).to(self.embeddings)
        for c in torch.unique(classes).tolist():
            rows = z[classes == c][-self.size :]
            n = len(rows)
            slots = (self.next[c] + torch.arange(n, device=z.device)) % self.size
            self.embeddings[c, slots] = rows
            self.next[c] = (self.next[c] + n) % self.size
            self.filled[c] = torch.clamp(self.filled[c] + n, max=self.size)


class KeyQueue(ClassMemory):
    """
    A MoCo queue: the last ``size`` target keys (l2-normalised), first in, first out — the negatives
    an InfoNCE term contrasts against besides the batch's, so that their number does not depend on
    the batch size. A :class:`ClassMemory` of one class (buffers: saved in checkpoints); push the
    same keys on every process (all-gathered ones) to keep one queue.
    """

    def __init__(self, size: int, dim: int):
        super().__init__(num_classes=1, size=size, dim=dim)

    def entries(self) -> torch.Tensor:
        """Tensor[E, D], every valid key (E <= size), in no particular order."""
        return super().entries()[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Add ``keys`` (Tensor[R, D]) in row order, replacing the oldest once full."""
        super().push(keys, torch.zeros(len(keys), dtype=torch.int64, device=keys.device))

    def exchange(self, keys: torch.Tensor) -> torch.Tensor:
        """This step's negatives, Tensor[E, D] like ``keys``: the keys held before ``keys``
        (Tensor[R, D], this step's), which are then pushed — so a step never meets its own keys."""
        negatives = self.entries().to(keys)
        self.push(keys)
        return negatives


def check_key_queue(prefix: str, queue, loss: str) -> None:
    """Raise ValueError naming ``<prefix>.QUEUE_SIZE`` when a head with loss ``loss`` is given a
    queue: only the InfoNCE loss has negatives."""
    if queue is not None and loss != "infonce":
        raise ValueError(
            f"{prefix}.QUEUE_SIZE > 0: a queue holds negatives, which only the InfoNCE loss has; "
            f"set {prefix}.LOSS to 'infonce' (it is {loss!r}) or QUEUE_SIZE to 0."
        )


def build_key_queue(key: str, size, dim: int):
    """
    The :class:`KeyQueue` of config key ``key`` (``MODEL.DRCL2.<HEAD>.QUEUE_SIZE``) for keys of
    ``dim`` values, or None for 0. Raises ValueError naming the key unless ``size`` is an integer
    >= 0.
    """
    if isinstance(size, bool) or int(size) != size or size < 0:
        raise ValueError(f"{key} = {size!r}: must be an integer >= 0 (0: no queue).")
    return KeyQueue(int(size), dim) if size > 0 else None


class AppearanceDecoder(nn.Module):
    """
    The AR decoder on P2: conv3x3 - ReLU - conv1x1 to ``3 * s * s`` channels, pixel-shuffle x s,
    where s is the stride of its input feature (4 for P2), predicting the normalised image.
    """

    def __init__(self, in_channels: int, hidden_channels: int, stride: int, out_channels: int = 3):
        """
        Args:
            in_channels: channels of the input feature (256 for FPN).
            hidden_channels: channels after the 3x3 conv.
            stride: stride of the input feature w.r.t. the image (the pixel-shuffle factor).
            out_channels: image channels.
        """
        super().__init__()
        self.stride = stride
        self.conv = Conv2d(
            in_channels, hidden_channels, kernel_size=3, padding=1, activation=F.relu
        )
        self.predictor = Conv2d(hidden_channels, out_channels * stride * stride, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """
        Args:
            feature: Tensor[N, C, H / s, W / s].

        Returns:
            Tensor[N, 3, H, W].
        """
        return F.pixel_shuffle(self.predictor(self.conv(feature)), self.stride)


class SemanticPredictors(nn.Module):
    """
    One SR predictor per feature level: conv1x1 - BN - ReLU - conv1x1 (channels kept), mapping the
    online features of the masked view onto the target features of the unmasked view.
    """

    def __init__(self, in_features: List[str], channels: int, hidden_channels: int, norm: str):
        """
        Args:
            in_features: names of the feature levels (e.g. ["p3", "p4", "p5"]).
            channels: channels of those features.
            hidden_channels: channels after the first conv.
            norm: the norm after the first conv (any :func:`get_norm` name, "" for none).
        """
        super().__init__()
        self.in_features = list(in_features)
        self.predictors = nn.ModuleDict()
        for name in self.in_features:
            self.predictors[name] = nn.Sequential(
                Conv2d(channels, hidden_channels, kernel_size=1, bias=not norm),
                _Float32(get_norm(norm, hidden_channels)) if norm else nn.Identity(),
                nn.ReLU(),
                Conv2d(hidden_channels, channels, kernel_size=1),
            )

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: level name -> Tensor[N, C, H_l, W_l].

        Returns:
            level name -> Tensor[N, C, H_l, W_l] for each of ``in_features``.
        """
        return {name: self.predictors[name](features[name]) for name in self.in_features}


class _Float32(nn.Module):
    """Runs the wrapped normalisation in float32 or wider with autocast off (AMP-safe
    statistics)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.module(at_least_float32(x))
