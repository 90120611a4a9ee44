"""
The momentum (EMA) target network of 2DRCL (docs/method.md): ``xi <- m xi + (1 - m) theta`` with the
cosine schedule ``m(k) = 1 - (1 - m0) (cos(pi k / K) + 1) / 2``.
"""

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "make_target", "momentum_update"]


def cosine_momentum(base_momentum: float, iteration: int, max_iter: int) -> float:
    """
    BYOL's cosine momentum schedule, rising from ``base_momentum`` at iteration 0 to 1 at
    ``max_iter``.

    Args:
        base_momentum: m0 in [0, 1].
        iteration: the current iteration k (clamped to [0, max_iter]).
        max_iter: K, the length of the schedule.
    """
    k = min(max(iteration, 0), max_iter)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * k / max(max_iter, 1)) + 1.0) / 2.0


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` (``requires_grad=False`` on every parameter)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """
    ``target <- momentum * target + (1 - momentum) * online`` on every floating-point parameter and
    buffer (BN running statistics follow the same rule; integer buffers such as
    ``num_batches_tracked`` are copied). ``online`` and ``target`` must have identical structure.
    """
    online_state = dict(online.named_parameters())
    online_state.update(online.named_buffers())
    for name, t in list(target.named_parameters()) + list(target.named_buffers()):
        o = online_state[name]
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(o)
