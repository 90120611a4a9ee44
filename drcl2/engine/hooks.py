"""Training hooks of drcl2."""

import logging
from typing import Callable

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.rebalance import RebalanceSchedule, chunked_lambda
from ..data.resumable_loader import STEP_STREAM, derived_seed, seed_global_random_state

__all__ = ["RebalanceLambdaHook", "StepSeedHook", "LoaderStateHook"]

logger = logging.getLogger(__name__)


class RebalanceLambdaHook(HookBase):
    """
    Puts the λ that the dynamic rebalancing sampler used for the current iteration's images into
    the :class:`EventStorage` each step (scalar ``drb/lambda``), so it shows in ``metrics.json`` and
    TensorBoard next to the losses.

    The sampler runs inside the DataLoader workers; its λ is a pure function of the iteration
    (:func:`drcl2.data.rebalance.chunked_lambda`: the schedule's value at the start of the
    iteration's chunk), computed here from the same config, so the logged value is the sampled one.
    """

    def __init__(self, schedule: RebalanceSchedule, max_iter: int, chunk_iters: int, name: str = "drb/lambda"):
        """
        Args:
            schedule: anything with ``lam(progress)``, e.g. :class:`RebalanceSchedule`.
            max_iter (int): length of the schedule (``SOLVER.MAX_ITER``).
            chunk_iters (int): the sampler's ``DATALOADER.DRCL2.CHUNK_ITERS``.
            name (str): name of the scalar.
        """
        self._schedule = schedule
        self._max_iter = max(int(max_iter), 1)
        self._chunk_iters = int(chunk_iters)
        self._name = name

    @classmethod
    def from_config(cls, cfg):
        drb = cfg.DATALOADER.DRCL2
        return cls(RebalanceSchedule.from_config(cfg), cfg.SOLVER.MAX_ITER, drb.CHUNK_ITERS)

    def lam_at(self, iteration: int) -> float:
        return chunked_lambda(self._schedule.lam, iteration, self._max_iter, self._chunk_iters)

    def before_step(self):
        # before_step: the storage's iteration is already the current one, and every writer hook
        # (after_step) sees the value of this step whatever the hook order.
        self.trainer.storage.put_scalar(
            self._name, self.lam_at(self.trainer.iter), smoothing_hint=False
        )


class StepSeedHook(HookBase):
    """
    Seeds python's, numpy's and torch's global random state before each step from
    ``(seed, iteration, rank)``, so the step's own random numbers (detectron2's RPN / ROI
    sampling, anything drawn from the global generators) are the same in a resumed run as in
    the uninterrupted one. (The images' augmentations are seeded per image by the data loader.)
    """

    def __init__(self, seed: Callable[[], int]):
        """
        Args:
            seed: returns the run's seed (read each step: a resumed run may restore it).
        """
        self._seed = seed

    def before_step(self):
        seed = derived_seed(self._seed(), STEP_STREAM, comm.get_rank(), self.trainer.iter)
        seed_global_random_state(seed)


class LoaderStateHook(HookBase):
    """
    Puts the run's seed and every process's data loader state (:class:`ResumableTrainLoader`) into
    the trainer's checkpoints, and hands them back on resume (:attr:`loaded`).

    Checkpoints are written by the main process alone, so at each iteration the checkpointer saves
    (every ``period`` iterations and the last one) the states are gathered from all processes in
    ``after_step``; this hook must come before the checkpointer. With one process the live state
    is saved, whatever iteration a checkpoint is written at.
    """

    def __init__(self, seed: Callable[[], int], period: int, max_iter: int):
        self._seed = seed
        self._period = int(period)
        self._max_iter = int(max_iter)
        self._gathered = None  # (iteration, [state of each rank])
        self.loaded = None  # what a checkpoint gave back: {"seed", "ranks"}

    def _loader_state(self):
        loader = self.trainer._trainer.data_loader
        return loader.state_dict() if hasattr(loader, "state_dict") else None

    def after_step(self):
        if comm.get_world_size() == 1:
            return
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it >= self._max_iter - 1:
            self._gathered = (it, comm.all_gather(self._loader_state()))

    def state_dict(self):
        if comm.get_world_size() == 1:
            ranks = [self._loader_state()]
        elif self._gathered is not None and self._gathered[0] == self.trainer.iter:
            ranks = self._gathered[1]
        else:
            logger.warning(
                f"Checkpoint at iteration {self.trainer.iter}: the data loader states of the other "
                "processes were not gathered (not a SOLVER.CHECKPOINT_PERIOD iteration); a resume "
                "from it restarts the aspect-ratio buckets."
            )
            ranks = None
        return {"seed": int(self._seed()), "ranks": ranks}

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)
