"""
The 2DRCL loss terms (docs/method.md), as pure functions of tensors so each can be unit-tested
without a model. Every function computes in float32 or wider whatever its input dtype (safe under
AMP; float64 inputs stay float64).

Each is a mean over items (images, instances, pixels). ``normalizer=None`` averages over this call's
items; a number divides the summed loss by it instead. Under DDP the model passes the global count
divided by the world size (:func:`drcl2.modeling.distributed.ddp_normalizer`), so that DDP's average
over ranks is the mean over the global batch.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "at_least_float32",
    "byol_loss",
    "info_nce_loss",
    "balanced_supervised_contrastive_loss",
    "appearance_reconstruction_loss",
    "semantic_reconstruction_loss",
    "semantic_reconstruction_weights",
    "decorrelation_loss",
    "scale_gradient",
]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is a half-precision float (AMP), else unchanged (float32,
    float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def byol_loss(
    online: torch.Tensor, target: torch.Tensor, normalizer: Optional[float] = None
) -> torch.Tensor:
    """
    BYOL regression loss ``mean_i (2 - 2 cos(online_i, sg(target_i)))``.

    Args:
        online: Tensor[N, D], predictions of the online network.
        target: Tensor[N, D], projections of the target network (no gradient flows into them).
        normalizer: divide the sum over i by this instead of N (see module doc).

    Returns:
        scalar Tensor; 0 for N == 0 (still connected to ``online`` so every rank builds a graph).
    """
    if online.shape != target.shape:
        raise ValueError(
            f"byol_loss: shapes differ, {tuple(online.shape)} vs {tuple(target.shape)}"
        )
    online = F.normalize(at_least_float32(online), dim=1)
    target = F.normalize(at_least_float32(target.detach()), dim=1)
    if online.shape[0] == 0:
        return online.sum() * 0.0
    per_item = 2.0 - 2.0 * (online * target).sum(dim=1)
    return per_item.mean() if normalizer is None else _divide(per_item.sum(), normalizer)


def info_nce_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """
    InfoNCE ``-mean_i log( exp(q_i.k_{p(i)}/tau) / sum_j exp(q_i.k_j/tau) )`` with cosine
    similarity.

    Args:
        query: Tensor[N, D], online embeddings of this rank's images.
        keys: Tensor[M, D], target embeddings of the global batch (all ranks, no gradient).
        positive_index: LongTensor[N], index in ``keys`` of each query's positive.
        temperature: tau > 0.
        normalizer: divide the sum over the N queries by this instead of N (see module doc).

    Returns:
        scalar Tensor.
    """
    q = F.normalize(at_least_float32(query), dim=1)
    k = F.normalize(at_least_float32(keys.detach()), dim=1)
    if q.shape[0] == 0:
        return q.sum() * 0.0
    logits = _matmul_no_autocast(q, k.t()) / temperature
    if normalizer is None:
        return F.cross_entropy(logits, positive_index.to(logits.device))
    return _divide(
        F.cross_entropy(logits, positive_index.to(logits.device), reduction="sum"), normalizer
    )


def balanced_supervised_contrastive_loss(
    online: torch.Tensor,
    online_classes: torch.Tensor,
    online_weights: torch.Tensor,
    target: torch.Tensor,
    target_classes: torch.Tensor,
    temperature: float,
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """
    The class-balanced supervised-contrastive term L_sup of docs/method.md (LCL):

    ``D_i = sum_c (1/|A_c|) sum_{j in A_c} exp(u_i.v_j/tau)``,
    ``l_i = -(1/|P(i)|) sum_{p in P(i)} log(exp(u_i.v_p/tau) / D_i)`` with ``P(i) = A_{y_i}``,
    ``L = sum_i w_i l_i / sum_i w_i``.

    Args:
        online: Tensor[N, D], online embeddings u_i of this rank's instances (normalised here).
        online_classes: LongTensor[N], their classes y_i.
        online_weights: Tensor[N], their weights w_{y_i} (>= 0).
        target: Tensor[M, D], target embeddings v_j of the global batch (normalised here; no
            gradient). Every class of ``online_classes`` must occur in ``target_classes`` (each
            instance's own target embedding is among them).
        target_classes: LongTensor[M], their classes.
        temperature: tau > 0.
        normalizer: divide ``sum_i w_i l_i`` by this instead of ``sum_i w_i`` (see module doc; the
            sum of the weights over the global batch, divided by the world size).

    Returns:
        scalar Tensor; 0 (connected to ``online``) when N == 0.
    """
    u = F.normalize(at_least_float32(online), dim=1)
    if u.shape[0] == 0:
        return u.sum() * 0.0
    v = F.normalize(at_least_float32(target.detach()), dim=1)
    logits = _matmul_no_autocast(u, v.t()) / temperature  # [N, M]
    classes, target_cls_idx = torch.unique(target_classes, return_inverse=True)  # C', [M]
    one_hot = F.one_hot(target_cls_idx, num_classes=classes.numel()).to(logits.dtype)  # [M, C']
    class_sizes = one_hot.sum(dim=0)  # |A_c|, [C']
    # log D_i = logsumexp_j (logit_ij - log |A_{y_j}|): the class-averaged denominator, stably.
    log_denominator = torch.logsumexp(logits - class_sizes.log()[target_cls_idx][None, :], dim=1)
    positives = (online_classes[:, None].to(target_classes.device) == target_classes[None, :]).to(
        logits.dtype
    )  # [N, M]
    num_positives = positives.sum(dim=1)
    if bool((num_positives == 0).any()):
        raise ValueError(
            "balanced_supervised_contrastive_loss: an online instance's class has no target "
            "embedding; the target set must contain every online instance's own embedding."
        )
    per_instance = log_denominator - (positives * logits).sum(dim=1) / num_positives  # [N]
    weights = online_weights.to(device=per_instance.device, dtype=per_instance.dtype)
    if normalizer is None:
        normalizer = weights.sum().clamp(min=1e-12)
    return _divide((weights * per_instance).sum(), normalizer)


def appearance_reconstruction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    masked: torch.Tensor,
    valid: torch.Tensor,
    visible_weight: float,
    normalizers: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """
    AR loss: mean L1 over masked pixels + ``visible_weight`` x mean L1 over visible pixels; padding
    is ignored.

    Args:
        prediction: Tensor[N, 3, H, W], the decoder's output.
        target: Tensor[N, 3, H, W], the normalised unmasked image (no gradient).
        masked: BoolTensor[N, H, W], pixels set to zero in the online input.
        valid: BoolTensor[N, H, W], pixels inside the image (False on padding).
        visible_weight: weight of the visible-pixel term.
        normalizers: (masked, visible) pixel counts to divide the two sums by instead of this
            call's counts (see module doc).

    Returns:
        scalar Tensor.
    """
    l1 = (
        (at_least_float32(prediction) - at_least_float32(target.detach())).abs().mean(dim=1)
    )  # [N, H, W]
    masked = masked & valid
    visible = (~masked) & valid
    if normalizers is None:
        normalizers = (masked.sum(), visible.sum())
    loss = _divide((l1 * masked).sum(), _one_if_zero(normalizers[0]))
    if visible_weight > 0:
        loss = loss + visible_weight * _divide((l1 * visible).sum(), _one_if_zero(normalizers[1]))
    return loss


def semantic_reconstruction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    masked: torch.Tensor,
    valid: torch.Tensor,
    visible_weight: float,
    normalizer: Optional[float] = None,
) -> torch.Tensor:
    """
    SR loss on one feature level: weighted mean over locations of ``1 - cos`` (cosine over
    channels), weight 1 at masked locations, ``visible_weight`` at visible ones, 0 on padding:
    ``sum_l w_l (1 - cos_l) / sum_l w_l``.

    Args:
        prediction: Tensor[N, C, H, W], the SR predictor's output on the masked view.
        target: Tensor[N, C, H, W], target-network features of the unmasked view (no gradient).
        masked: BoolTensor[N, H, W], locations whose stride cell holds a masked pixel.
        valid: BoolTensor[N, H, W], locations inside the image.
        visible_weight: weight of visible locations.
        normalizer: divide by this instead of ``sum_l w_l`` (see module doc).

    Returns:
        scalar Tensor.
    """
    cos = F.cosine_similarity(
        at_least_float32(prediction), at_least_float32(target.detach()), dim=1
    )  # [N, H, W]
    weight = semantic_reconstruction_weights(masked, valid, visible_weight)
    if normalizer is None:
        normalizer = weight.sum().clamp(min=1e-12)
    return _divide(((1.0 - cos) * weight).sum(), normalizer)


def semantic_reconstruction_weights(
    masked: torch.Tensor, valid: torch.Tensor, visible_weight: float
):
    """
    The location weights of :func:`semantic_reconstruction_loss`: 1 masked, ``visible_weight``
    visible, 0 on padding. BoolTensor[N, H, W] x 2 -> Tensor[N, H, W] float32.
    """
    return (masked & valid).float() + visible_weight * ((~masked) & valid).float()


def decorrelation_loss(features: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """
    Redundancy between channels: the mean squared off-diagonal entry of the channels' correlation
    matrix over the M samples, ``sum_{i != j} r_ij^2 / (C (C - 1))``. 0 when the channels are
    uncorrelated, 1 when all are one signal up to scale (rank-1 features); independent noise gives
    about 1 / M. Scale-free (each channel is standardised), so it does not fix the features' size.
    The anti-collapse half of VICReg's covariance term / Barlow Twins' redundancy reduction,
    within one view.

    Args:
        features: Tensor[M, C], M samples (e.g. feature-map locations) of C >= 2 channels, M >= 2.
        eps: times the mean channel variance, added to each channel's variance: a channel far
            quieter than the others (or constant) counts as uncorrelated.

    Returns:
        scalar Tensor.
    """
    x = at_least_float32(features)
    m, c = x.shape
    if m < 2 or c < 2:
        raise ValueError(
            f"decorrelation_loss: needs >= 2 samples and >= 2 channels; got shape {tuple(x.shape)}."
        )
    x = x - x.mean(dim=0, keepdim=True)
    variance = x.pow(2).sum(dim=0, keepdim=True) / (m - 1)
    z = x / (variance + eps * variance.mean().detach() + 1e-12).sqrt()
    corr = _matmul_no_autocast(z.t(), z) / (m - 1)  # [C, C]
    off_diagonal = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    return off_diagonal / (c * (c - 1))


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass (0:
    none)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)


def _matmul_no_autocast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype: autocast would run it in half precision."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a @ b


def _divide(total: torch.Tensor, normalizer) -> torch.Tensor:
    """``total / normalizer`` in the dtype of ``total`` (a float64 count tensor must not promote
    it)."""
    if torch.is_tensor(normalizer):
        normalizer = normalizer.to(total.dtype)
    return total / normalizer


def _one_if_zero(count):
    """An empty sum (count 0) is divided by 1 instead; ``count`` is a Python number or a Tensor."""
    if torch.is_tensor(count):
        return torch.where(count > 0, count, torch.ones_like(count))
    return count if count > 0 else 1.0
