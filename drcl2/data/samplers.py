"""The dynamic rebalancing training sampler (METHOD.md, "DRB")."""

import logging
import numbers
from typing import Callable, List, Optional, Union

import numpy as np
import torch
from torch.utils.data.sampler import Sampler

from detectron2.utils import comm

from .rebalance import RebalanceSchedule, image_repeat_factor_sets, mix_repeat_factors

__all__ = ["DynamicRepeatFactorTrainingSampler"]

logger = logging.getLogger(__name__)


class _ConstantLambda:
    """A schedule with the same λ all along (a class, not a lambda: workers may pickle it)."""

    def __init__(self, lam):
        self.lam_value = float(lam)
        if not 0.0 <= self.lam_value <= 1.0:
            raise ValueError(f"A constant schedule must lie in [0, 1]; got {self.lam_value}.")

    def __call__(self, progress: float) -> float:
        return self.lam_value


class DynamicRepeatFactorTrainingSampler(Sampler):
    """
    detectron2's :class:`RepeatFactorTrainingSampler` with repeat factors that move from image level
    to instance level along a schedule: an infinite stream of dataset indices where every pass over
    the data repeats image I an integer number of times, the stochastic rounding of

        r_I(λ) = (1 - λ) max_{c in I} r_c^img + λ max_{c in I} r_c^ins,

    with λ the schedule's value at the iteration that pass starts. Positions are counted in the
    global (all ranks) stream: iteration = images emitted globally // ``ims_per_batch``.

    * With a schedule fixed at λ = 0 the stream is that of
      ``RepeatFactorTrainingSampler(repeat_factors_from_category_frequency(...), seed=seed)``,
      index for index: the random numbers are drawn in the same order from the same generator.
    * All randomness comes from its own generator seeded with ``seed``, and λ is derived from the
      sampler's own position, so the copies detectron2 runs in each DataLoader worker
      (``ToIterableDataset``) agree; the stream is deterministic given seed and world size.
    * Sharded across ranks like detectron2's samplers: rank r takes positions r, r + W, r + 2W, ...
      of the global stream.
    * ``start_iter`` resumes the stream: the sampler replays the passes before position
      ``start_iter * ims_per_batch`` (only their random numbers; nothing is emitted) and continues
      from there, so a resumed run sees the same indices and the same λ as an uninterrupted one.
    """

    def __init__(
        self,
        dataset_dicts: List[dict],
        *,
        repeat_thresh: float = 0.001,
        schedule: Union[RebalanceSchedule, Callable[[float], float], float],
        max_iter: int,
        ims_per_batch: int,
        start_iter: int = 0,
        shuffle: bool = True,
        seed: Optional[int] = None,
    ):
        """
        Args:
            dataset_dicts (list[dict]): detectron2 dataset dicts (only the annotations' category
                ids are read; the sampler keeps two float vectors, not the dicts).
            repeat_thresh (float): t of repeat-factor sampling (fraction of images), > 0.
            schedule: λ as a function of training progress in [0, 1] — a
                :class:`RebalanceSchedule` (anything with ``lam(progress)``), a callable, or a
                number for a constant λ.
            max_iter (int): length of the training schedule; progress = iteration / max_iter.
            ims_per_batch (int): images per iteration over all ranks (``SOLVER.IMS_PER_BATCH``).
            start_iter (int): the iteration the stream starts at (a resumed run's start).
            shuffle (bool): shuffle each pass (else indices come in dataset order, repeated).
            seed (int or None): seed of the generator; must be the same on all ranks. None draws a
                shared random seed (needs all ranks).
        """
        if int(max_iter) <= 0:
            raise ValueError(f"max_iter must be a positive number of iterations; got {max_iter}.")
        if int(ims_per_batch) <= 0:
            raise ValueError(f"ims_per_batch must be positive; got {ims_per_batch}.")
        if int(start_iter) < 0:
            raise ValueError(f"start_iter must be >= 0; got {start_iter}.")
        self._image_level, self._instance_level = image_repeat_factor_sets(
            dataset_dicts, repeat_thresh
        )
        self._repeat_thresh = float(repeat_thresh)
        if isinstance(schedule, numbers.Real):
            self._lam_of_progress = _ConstantLambda(schedule)
        elif hasattr(schedule, "lam"):
            self._lam_of_progress = schedule.lam
        elif callable(schedule):
            self._lam_of_progress = schedule
        else:
            raise TypeError(
                f"schedule must be a RebalanceSchedule, a callable or a number; got {schedule!r}."
            )
        self.schedule = schedule
        self._max_iter = int(max_iter)
        self._ims_per_batch = int(ims_per_batch)
        self._start_iter = int(start_iter)
        self._shuffle = bool(shuffle)
        if seed is None:
            seed = comm.shared_random_seed()
        self._seed = int(seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self._cached_lam = None

        n = len(self._image_level)
        logger.info(
            f"DynamicRepeatFactorTrainingSampler: {n} images, t={self._repeat_thresh}, "
            f"{schedule!r}; images per pass ~{self._image_level.sum():.0f} at λ=0, "
            f"~{self._instance_level.sum():.0f} at λ=1; starting at iteration {self._start_iter}."
        )

    @classmethod
    def from_config(cls, cfg, dataset_dicts: List[dict], start_iter: int = 0):
        """
        The sampler of ``cfg.DATALOADER.DRCL2`` (REPEAT_THRESHOLD, START, END, MODE; START and END
        are fractions of ``SOLVER.MAX_ITER``), with ``SOLVER.IMS_PER_BATCH`` and ``SEED`` (passed as
        detectron2 passes it to its RepeatFactorTrainingSampler). ``start_iter`` is the iteration a
        resumed run starts at (see :meth:`drcl2.engine.Trainer.resume_or_load`).
        """
        drb = cfg.DATALOADER.DRCL2
        return cls(
            dataset_dicts,
            repeat_thresh=drb.REPEAT_THRESHOLD,
            schedule=RebalanceSchedule(drb.START, drb.END, drb.MODE),
            max_iter=cfg.SOLVER.MAX_ITER,
            ims_per_batch=cfg.SOLVER.IMS_PER_BATCH,
            start_iter=start_iter,
            shuffle=True,
            seed=cfg.SEED,
        )

    def lam_at(self, iteration: int) -> float:
        """λ of the schedule at ``iteration`` (a pass starting there uses this λ)."""
        lam = float(self._lam_of_progress(min(iteration / self._max_iter, 1.0)))
        if not 0.0 <= lam <= 1.0:
            raise ValueError(
                f"The schedule gave λ={lam} at iteration {iteration}; λ must lie in [0, 1]."
            )
        return lam

    def repeat_factors_at(self, lam: float) -> torch.Tensor:
        """r_I(λ) for every image, Tensor[N] float32."""
        return torch.from_numpy(
            mix_repeat_factors(self._image_level, self._instance_level, float(lam))
        )

    def _rounding_parts(self, lam):
        # λ is piecewise constant in practice (flat before START and after END): recompute the
        # factors only when it changes.
        if lam != self._cached_lam:
            factors = mix_repeat_factors(self._image_level, self._instance_level, lam)
            int_part = np.trunc(factors)
            self._frac_part = factors - int_part  # float32, as detectron2 splits its factors
            self._int_part = int_part.astype(np.int64)
            self._cached_lam = lam
        return self._int_part, self._frac_part

    def _pass_indices(self, lam: float, generator: torch.Generator) -> np.ndarray:
        """
        One pass over the data: ndarray[P] int64 of dataset indices, each image repeated by the
        stochastic rounding of r_I(λ), shuffled. Draws from ``generator`` exactly what detectron2's
        RepeatFactorTrainingSampler draws for one epoch (``rand(N)`` then ``randperm(P)``).
        """
        int_part, frac_part = self._rounding_parts(lam)
        # The random numbers come from the torch generator (same draws as detectron2); the rest is
        # numpy, single-threaded — these small element-wise ops run in DataLoader workers, where
        # torch's thread pool only adds overhead.
        rands = torch.rand(len(frac_part), generator=generator).numpy()
        indices = np.repeat(np.arange(len(frac_part)), int_part + (rands < frac_part))
        if self._shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
        return indices

    def _infinite_indices(self):
        """This rank's part of the global stream, from position ``start_iter * ims_per_batch``."""
        g = torch.Generator()
        g.manual_seed(self._seed)
        world, begin = self._world_size, self._start_iter * self._ims_per_batch
        # Rank r takes positions begin + r + k * world, like detectron2's islice(rank, None, world).
        phase = (begin + self._rank) % world
        position = 0  # global position of the first index of the current pass
        while True:
            indices = self._pass_indices(self.lam_at(position // self._ims_per_batch), g)
            end = position + len(indices)
            if end > begin:
                first = max(position, begin)
                first += (phase - first) % world  # first position >= `first` that is ours
                yield from indices[first - position :: world].tolist()
            position = end

    def __iter__(self):
        yield from self._infinite_indices()
