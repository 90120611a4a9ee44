"""
The collectives of DRCL2's training step (docs/method.md: across GPUs every loss is the global
mean).

Each is a ``torch.distributed`` collective of tensors on the default process group (NCCL on GPU,
gloo on CPU), on the caller's device: nothing is pickled, and no tensor on another rank's device is
ever created (detectron2's ``comm.all_gather`` pickles objects, which rebuilds rank k's CUDA tensors
on ``cuda:k`` in every process). With one process they return their input and communicate nothing.

Normalisation convention: DDP averages gradients over the W ranks, and detectron2's trainer averages
the logged loss values over the ranks. A rank therefore returns ``W * (its part of the global sum) /
(global count)``, i.e. its sum divided by :func:`ddp_normalizer` of the global count, so that the
average over ranks is the global mean.
"""

from typing import List, Sequence

import torch
import torch.distributed as dist
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from torch import nn

__all__ = [
    "exchange_step_counts",
    "all_gather_counts",
    "all_gather_rows",
    "ddp_normalizer",
    "batch_norm_trains",
]


def all_gather_counts(counts: torch.Tensor) -> torch.Tensor:
    """
    The per-rank counts of one step (images, instances, pixels, ...) of every rank, in one
    collective.

    Args:
        counts: Tensor[K] (float64: exact for integer counts and sums of weights), this rank's.

    Returns:
        Tensor[W, K] on ``counts.device``: row r holds rank r's counts.
    """
    if comm.get_world_size() == 1:
        return counts[None]
    out = [torch.empty_like(counts) for _ in range(comm.get_world_size())]
    dist.all_gather(out, counts.contiguous())
    return torch.stack(out)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """
    Concatenate along dim 0 the ``x`` of every rank, in rank order, without gradient.

    Ranks may hold different numbers of rows: each pads its rows to ``max(sizes)``, one
    ``all_gather`` exchanges the padded tensors, and the padding is dropped.

    Args:
        x: Tensor[sizes[rank], *S], this rank's rows (all ranks: same ``S``, dtype and device type).
        sizes: the number of rows of every rank, in rank order (the same list on every rank, e.g.
            from :func:`all_gather_counts`).

    Returns:
        Tensor[sum(sizes), *S] on ``x.device``.
    """
    x = x.detach()
    if comm.get_world_size() == 1:
        return x
    sizes = [int(n) for n in sizes]
    if len(sizes) != comm.get_world_size() or x.shape[0] != sizes[comm.get_rank()]:
        raise ValueError(
            f"all_gather_rows: this rank (rank {comm.get_rank()}) holds {x.shape[0]} rows but "
            f"sizes = {sizes} for {comm.get_world_size()} ranks."
        )
    longest = max(sizes)
    if longest == 0:
        return x
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered: List[torch.Tensor] = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([t[:n] for t, n in zip(gathered, sizes)])


def ddp_normalizer(global_count):
    """
    What a rank divides its sum by for the average over ranks (DDP's gradient average) to be the
    global mean: ``global_count / world_size`` (a number, or a Tensor kept on its device).
    1 process: the count itself.
    """
    return global_count / comm.get_world_size()


def batch_norm_trains(sizes: Sequence[int], *modules: nn.Module) -> bool:
    """
    Whether every batch norm inside ``modules`` can take a training step on a batch split over the
    ranks as ``sizes`` (rows of every rank), without failing or normalising a single value:

    * no batch norm (GN, LN, none): at least 1 row in all;
    * detectron2's ``NaiveSyncBatchNorm(stats_mode="N")`` (``naiveSyncBN_N``) and torch's
      ``SyncBatchNorm``: statistics of the global batch, >= 2 rows in all (a rank may hold none);
    * ``NaiveSyncBatchNorm(stats_mode="")`` (``naiveSyncBN``): >= 2 rows in all, >= 1 on every rank;
    * any other batch norm (``BN``): per-rank statistics, >= 2 rows on every rank.

    With one process (``sizes == [n]``) every kind is a plain batch norm: ``n >= 2``. The answer
    depends on ``sizes`` only, so all ranks take the same branch.
    """
    sizes = [int(n) for n in sizes]
    ok = sum(sizes) >= 1
    for m in (m for module in modules for m in module.modules()):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(m, nn.SyncBatchNorm) or (
            isinstance(m, NaiveSyncBatchNorm) and m._stats_mode == "N"
        ):
            ok = ok and sum(sizes) >= 2
        elif isinstance(m, NaiveSyncBatchNorm):
            ok = ok and sum(sizes) >= 2 and min(sizes) >= 1
        else:
            ok = ok and min(sizes) >= 2
    return ok


def exchange_step_counts(num_images: int, num_instances: int, head_sums, device):
    """
    This rank's images, drawn instances and the pretext heads' sums, exchanged with every rank in
    one collective (:func:`all_gather_counts`).

    Args:
        num_images, num_instances: this rank's.
        head_sums: per head, a list of 0-dim Tensors (its :meth:`PretextHead.counts`).

    Returns:
        list[int] images of every rank, list[int] drawn instances of every rank (rank order), and
        per head, Tensor[P_h]: the DDP normalisers of its sums (global sums / world size).
    """
    sums = [x for head in head_sums for x in head]
    local = torch.tensor([num_images, num_instances], dtype=torch.float64, device=device)
    if sums:
        local = torch.cat([local, torch.stack(sums).double()])
    gathered = all_gather_counts(local)  # [W, 2 + P]
    if comm.get_world_size() == 1:
        image_counts, instance_counts = [num_images], [num_instances]
    else:
        image_counts, instance_counts = gathered[:, :2].round().long().t().tolist()
    normalizers, start, out = ddp_normalizer(gathered[:, 2:].sum(dim=0)), 0, []
    for head in head_sums:
        out.append(normalizers[start : start + len(head)])
        start += len(head)
    return image_counts, instance_counts, out
