"""The dynamic rebalancing training sampler (docs/method.md, "DRB")."""

import logging
import numbers
from typing import Callable, List, Optional, Union

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data.sampler import Sampler

from .rebalance import (
    RebalanceSchedule,
    chunked_lambda,
    image_repeat_factor_sets,
    mix_repeat_factors,
)

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
    to instance level along a schedule: an infinite stream of dataset indices in which image I
    appears, per pass over the data, the stochastic rounding of

        r_I(λ) = (1 - λ) max_{c in I} r_c^img + λ max_{c in I} r_c^ins

    times, with λ taken in **chunks** of ``chunk_iters`` iterations: chunk j (iterations
    ``j * chunk_iters ...``) uses the schedule's λ at its first iteration (:meth:`lam_at`). A
    pass starts with one uniform draw u_I per image and a shuffle; when λ changes at a chunk
    boundary, the rest of the pass is re-drawn: image I keeps ``n_I(λ) - (times already emitted in
    this pass)`` more appearances (at least 0), with ``n_I(λ) = floor(r_I(λ)) + [u_I <
    frac(r_I(λ))]`` from the same u_I, shuffled again. So λ moves within a pass (a short schedule
    may be a single pass, and LVIS 1x is only about 10), and each pass still holds every image about
    r_I times.

    Positions are counted in the global (all ranks) stream: iteration = images emitted globally
    // ``ims_per_batch``.

    * With a schedule fixed at λ = 0 nothing is ever re-drawn, and the stream is that of
      ``RepeatFactorTrainingSampler(repeat_factors_from_category_frequency(...), seed=seed)``,
      index for index: the random numbers are drawn in the same order from the same generator.
    * All randomness comes from its own generator seeded with ``seed``, and λ is derived from the
      sampler's own position, so the copies detectron2 runs in each DataLoader worker
      (``ToIterableDataset``) agree; the stream is deterministic given seed and world size.
    * Sharded across ranks like detectron2's samplers: rank r takes positions r, r + W, r + 2W, ...
      of the global stream.
    * ``start_iter`` resumes the stream: the sampler replays the stream before position
      ``start_iter * ims_per_batch`` (only its random numbers; nothing is emitted) and continues
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
        chunk_iters: int = 10,
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
            chunk_iters (int): λ is re-taken from the schedule every this many iterations.
            start_iter (int): the iteration the stream starts at (a resumed run's start).
            shuffle (bool): shuffle each pass (else indices come in dataset order, repeated).
            seed (int or None): seed of the generator; must be the same on all ranks. None draws a
                shared random seed (needs all ranks).
        """
        if int(max_iter) <= 0:
            raise ValueError(f"max_iter must be a positive number of iterations; got {max_iter}.")
        if int(ims_per_batch) <= 0:
            raise ValueError(f"ims_per_batch must be positive; got {ims_per_batch}.")
        if int(chunk_iters) <= 0:
            raise ValueError(
                f"chunk_iters must be a positive number of iterations; got {chunk_iters}."
            )
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
        self._chunk_iters = int(chunk_iters)
        self._start_iter = int(start_iter)
        self._shuffle = bool(shuffle)
        if seed is None:
            seed = comm.shared_random_seed()
        self._seed = int(seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

        n = len(self._image_level)
        logger.info(
            f"DynamicRepeatFactorTrainingSampler: {n} images, t={self._repeat_thresh}, "
            f"{schedule!r}, λ re-taken every {self._chunk_iters} iterations; images per pass "
            f"~{self._image_level.sum():.0f} at λ=0, ~{self._instance_level.sum():.0f} at λ=1; "
            f"starting at iteration {self._start_iter}."
        )

    @classmethod
    def from_config(
        cls,
        cfg,
        dataset_dicts: List[dict],
        start_iter: int = 0,
        seed: Optional[int] = None,
        schedule: Optional[RebalanceSchedule] = None,
    ):
        """
        The sampler of ``cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD``, ``SOLVER.IMS_PER_BATCH`` and
        ``SEED`` (passed as detectron2 passes it to its RepeatFactorTrainingSampler), with the run's
        rebalancing ``schedule`` (default: ``RebalanceSchedule.from_config(cfg)``; drcl2's Trainer
        passes the one it hands to the model too). ``start_iter`` is the iteration the stream
        starts at; ``seed`` (default ``SEED``) the run's seed.
        """
        schedule = RebalanceSchedule.from_config(cfg) if schedule is None else schedule
        return cls(
            dataset_dicts,
            repeat_thresh=cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD,
            schedule=schedule,
            max_iter=schedule.max_iter,
            ims_per_batch=cfg.SOLVER.IMS_PER_BATCH,
            chunk_iters=schedule.chunk_iters,
            start_iter=start_iter,
            shuffle=True,
            seed=cfg.SEED if seed is None else seed,
        )

    def lam_at(self, iteration: int) -> float:
        """
        The λ the sampler uses for the images of ``iteration``: the schedule's value at the first
        iteration of its chunk (see :func:`chunked_lambda`).
        """
        return chunked_lambda(self._lam_of_progress, iteration, self._max_iter, self._chunk_iters)

    def repeat_factors_at(self, lam: float) -> torch.Tensor:
        """r_I(λ) for every image, Tensor[N] float32."""
        return torch.from_numpy(
            mix_repeat_factors(self._image_level, self._instance_level, float(lam))
        )

    def _counts(self, lam: float, uniform: np.ndarray) -> np.ndarray:
        """n_I(λ): the stochastic rounding of r_I(λ) with the pass's uniform draws, ndarray[N]
        int64."""
        factors = mix_repeat_factors(self._image_level, self._instance_level, lam)
        int_part = np.trunc(factors)
        frac_part = factors - int_part  # float32, as detectron2 splits its factors
        return int_part.astype(np.int64) + (uniform < frac_part)

    def _shuffled(self, counts: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Each image ``counts[I]`` times, in random order (dataset order without shuffle)."""
        # The random numbers come from the torch generator (the draws detectron2 makes); the rest
        # is numpy, single-threaded: these small element-wise ops run in DataLoader workers, where
        # torch's thread pool only adds overhead.
        indices = np.repeat(np.arange(len(counts)), counts)
        if self._shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
        return indices

    def _global_stream(self):
        """
        The global stream from position 0, as (position, ndarray of indices) blocks that never
        cross a chunk boundary.
        """
        g = torch.Generator()
        g.manual_seed(self._seed)
        chunk = self._chunk_iters * self._ims_per_batch  # images per chunk
        n = len(self._image_level)
        position = 0
        lam = self.lam_at(0)
        while True:
            # A new pass: what detectron2 draws for one epoch (rand(N), then randperm(P)).
            uniform = torch.rand(n, generator=g).numpy()
            counts = self._counts(lam, uniform)
            queue, head = self._shuffled(counts, g), 0
            emitted = np.zeros(n, dtype=np.int64)
            while head < len(queue):
                boundary = (position // chunk + 1) * chunk
                block = queue[head : head + boundary - position]
                yield position, block
                head += len(block)
                position += len(block)
                if position < boundary:
                    break  # the pass ended inside the chunk
                new_lam = self.lam_at(position // self._ims_per_batch)
                if new_lam != lam and head < len(queue):
                    # Re-draw the rest of the pass at the new λ, with the pass's own u_I.
                    emitted += np.bincount(queue[:head], minlength=n)
                    counts = self._counts(new_lam, uniform)
                    queue, head = self._shuffled(np.maximum(counts - emitted, 0), g), 0
                lam = new_lam

    def _infinite_indices(self):
        """This rank's part of the global stream, from position ``start_iter * ims_per_batch``."""
        world, begin = self._world_size, self._start_iter * self._ims_per_batch
        # Rank r takes positions begin + r + k * world, like detectron2's islice(rank, None, world).
        phase = (begin + self._rank) % world
        for position, block in self._global_stream():
            end = position + len(block)
            if end > begin:
                first = max(position, begin)
                first += (phase - first) % world  # first position >= `first` that is ours
                yield from block[first - position :: world].tolist()

    def __iter__(self):
        yield from self._infinite_indices()
