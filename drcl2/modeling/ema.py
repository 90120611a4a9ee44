"""
The momentum (EMA) target network of 2DRCL (docs/method.md): ``xi <- m xi + (1 - m) theta`` with the
cosine schedule ``m(k) = 1 - (1 - m0) (cos(pi k / K) + 1) / 2``.
"""

import copy
import math
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["cosine_momentum", "make_target", "momentum_update", "TargetNetworkMixin"]


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


class TargetNetworkMixin:
    """
    The EMA target network of a model (an ``nn.Module`` with ``base_momentum`` and ``max_iter``):
    ``target_network[name]``, a frozen copy of the online module at a path of the model, moved by
    the model itself once per new iteration. Buffers record the schedule, so a checkpoint written
    after iteration k holds the target after step k - 1 and the pending step k, which the first
    forward after resuming applies with the checkpoint's online weights: the resumed run is exact.
    """

    def build_target_network(self, paths: Dict[str, str]) -> None:
        """Copy the online modules at ``paths`` (name -> dotted path) into ``target_network``."""
        self._target_paths = dict(paths)
        self.target_network = nn.ModuleDict(
            {name: make_target(self.get_submodule(p)) for name, p in self._target_paths.items()}
        )
        # False until the target network was copied from the (possibly freshly loaded) online one.
        self.register_buffer("target_initialized", torch.tensor(False))
        # The iteration of the last training forward, and whether its EMA step is still pending.
        self.register_buffer("last_iteration", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("target_update_pending", torch.tensor(False))

    def online_target_pairs(self) -> Dict[str, nn.Module]:
        """Name in ``target_network`` -> the online module it follows (looked up now)."""
        return {name: self.get_submodule(path) for name, path in self._target_paths.items()}

    @torch.no_grad()
    def reset_target(self) -> None:
        """Copy the online weights into the target network (start of training)."""
        for name, online in self.online_target_pairs().items():
            self.target_network[name].load_state_dict(online.state_dict())
        self.target_initialized.fill_(True)
        self.target_update_pending.fill_(False)

    @torch.no_grad()
    def update_target(self) -> Optional[float]:
        """Apply the pending EMA step now (with its iteration's momentum) and return the momentum;
        None when no step is pending (e.g. to inspect a final target)."""
        if not bool(self.target_update_pending):
            return None
        m = cosine_momentum(self.base_momentum, int(self.last_iteration), self.max_iter)
        for name, online in self.online_target_pairs().items():
            momentum_update(online, self.target_network[name], m)
        self.target_update_pending.fill_(False)
        return m

    def start_iteration(self, iteration: int) -> None:
        """
        Bring the target network up to date at the start of a training forward of ``iteration``:
        copy it the first time, else apply the previous iteration's EMA step when ``iteration`` is
        a new one (a second forward in the same iteration, e.g. gradient accumulation, changes
        nothing).
        """
        if not bool(self.target_initialized):
            self.reset_target()
        elif iteration != int(self.last_iteration):
            self.update_target()
        self.last_iteration.fill_(iteration)
        self.target_update_pending.fill_(True)
