"""
A training data loader that a checkpoint resumes exactly.

detectron2's training loader draws its augmentations from each worker's global random state and
groups images by aspect ratio in buckets that live only in memory, so a run resumed from a
checkpoint sees other crops, flips and batches than the uninterrupted run would have. Here every
image of a rank's stream has a **position** (0, 1, 2, ... in the order the sampler emits it), and

* the image at position p is mapped under random state seeded from ``(seed, rank, p)`` alone —
  the same views whichever worker maps it, for any ``DATALOADER.NUM_WORKERS``;
* workers take positions round robin (worker w of W: p ≡ w mod W) and the DataLoader returns them
  in position order, so the main process sees the images in stream order;
* aspect-ratio grouping runs in the main process, on the images a batch pads
  (:func:`orientation_bucket`: the mapped image's orientation, or for two views whether both are
  landscape, both portrait or mixed), and :meth:`ResumableTrainLoader.state_dict` records, after
  each batch, the next position and the positions still waiting in the buckets. A loader built from
  that state maps the waiting images again (same seeds, same views) and goes on from the next
  position: the batches that follow are those of the uninterrupted run.

The training step's own randomness (RPN / ROI sampling, 2DRCL's masking) is seeded per iteration
by :class:`drcl2.engine.hooks.StepSeedHook`.
"""

import itertools
import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.utils.data as torchdata
from detectron2.data.common import DatasetFromList

__all__ = ["ResumableTrainLoader", "orientation_bucket"]

from ..utils.seeding import IMAGE_STREAM, derived_seed, seeded_random_state

logger = logging.getLogger(__name__)


def _identity(x):
    return x


ORIENTATION_BUCKETS = 4  # landscape, portrait; two views: landscape/portrait, portrait/landscape


def orientation_bucket(mapped: dict) -> int:
    """
    The aspect-ratio group of a mapped dict, by the orientation (landscape: width > height) of the
    images a batch pads from it: 0 all landscape, 1 all portrait (or square); for two views,
    2 when view 1 is landscape and view 2 portrait, 3 the other way round.

    Those images are its two views' (``"view1"`` / ``"view2"``, :class:`TwoViewDatasetMapper`: each
    view is cropped on its own, so the original's orientation says nothing of theirs), else its
    ``"image"``, else the original's ``width`` / ``height`` (detectron2's rule). Mixed pairs are
    split by which view is landscape: measured by ``python benchmarks/benchmark.py padding``, one
    bucket for all mixed pairs padded more than detectron2's rule when view 1 is the whole image
    (2DRCL v2), two buckets pad less than either, with or without view 1 cropped (README, "Long
    runs").
    """
    views = [
        mapped[k]["image"]
        for k in ("view1", "view2")
        if isinstance(mapped.get(k), dict) and "image" in mapped[k]
    ]
    if views or "image" in mapped:
        landscape = [int(t.shape[-1]) > int(t.shape[-2]) for t in views or [mapped["image"]]]
    else:
        try:
            landscape = [mapped["width"] > mapped["height"]]
        except KeyError as e:
            raise KeyError(
                "DATALOADER.ASPECT_RATIO_GROUPING needs images ('image', or 'view1' / 'view2' "
                "with an 'image') or 'width' and 'height' in the mapper's output dicts; this "
                f"mapper's has keys {sorted(mapped)}. Keep them, or set "
                "DATALOADER.ASPECT_RATIO_GROUPING False."
            ) from e
    if len(set(landscape)) == 1:
        return 0 if landscape[0] else 1
    return 2 if landscape[0] else 3


class _PositionedStream(torchdata.IterableDataset):
    """
    Yields ``(position, dataset index, mapped dict)`` for the positions ``start, start + 1, ...``
    of a rank's sampler stream; in a DataLoader worker w of W, only positions ``start + w + k W``.
    """

    def __init__(self, dataset, sampler, mapper: Callable, seed: int, rank: int, start: int):
        self.dataset = dataset
        self.sampler = sampler
        self.mapper = mapper
        self.seed = seed
        self.rank = rank
        self.start = start

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start + worker
        indices = itertools.islice(iter(self.sampler), first, None, workers)
        for position, index in zip(itertools.count(first, workers), indices):
            mapped = map_at_position(
                self.dataset, self.mapper, int(index), position, self.seed, self.rank
            )
            yield position, int(index), mapped


def map_at_position(dataset, mapper: Callable, index: int, position: int, seed: int, rank: int):
    """
    ``mapper(dataset[index])`` under the random state of ``position`` in ``rank``'s stream. An
    exception names the image (e.g. PIL's "image file is truncated", which does not).
    """
    record = dataset[index]
    with seeded_random_state(derived_seed(seed, IMAGE_STREAM, rank, position)):
        try:
            return mapper(record)
        except Exception as e:
            where = (
                record.get("file_name", f"dataset index {index}")
                if isinstance(record, dict)
                else index
            )
            image_id = record.get("image_id") if isinstance(record, dict) else None
            message = (
                f"{e} — while mapping training image {where}"
                + (f" (image_id {image_id})" if image_id is not None else "")
                + ". Check the file (python -m drcl2.tools.check_dataset DATASET --images)."
            )
            try:
                named = type(e)(message)  # the same kind of error (OSError, ValueError, ...)
            except Exception:
                named = RuntimeError(message)
            raise named from e


class ResumableTrainLoader:
    """
    An iterable of training batches (lists of mapped dicts, ``batch_size`` per rank) whose stream is
    reproducible and resumable. Use it where detectron2's ``build_detection_train_loader`` is used.

    The batches are those of detectron2's loader in structure (aspect-ratio groups), with two
    differences: the groups are by the orientation of the images a batch pads
    (:func:`orientation_bucket`: a two-view dict's views, not its original), and each image's
    random numbers are seeded from its position, not from a worker's global state.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        sampler,
        mapper: Callable,
        *,
        batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        seed: int,
        rank: int = 0,
        state: Optional[Dict] = None,
        serialize: bool = True,
    ):
        """
        Args:
            dataset: the training dicts (serialized once, as detectron2 does, unless ``serialize``
            is
                False).
            sampler: an (infinite) iterable of dataset indices, this rank's stream (detectron2's
                samplers, :class:`DynamicRepeatFactorTrainingSampler`). It must be deterministic:
                seeded, not drawing a fresh seed per run.
            mapper: dict -> dict (or None to skip the image), e.g. DatasetMapper,
                TwoViewDatasetMapper.
            batch_size: images per batch on this rank.
            aspect_ratio_grouping: batch images of the same orientation together (detectron2's
                ``DATALOADER.ASPECT_RATIO_GROUPING``; by :func:`orientation_bucket`).
            num_workers: DataLoader worker processes (0: map in the main process).
            seed: the run's seed; image at position p is mapped under ``derived_seed(seed, 0, rank,
            p)``.
            rank: this process's rank.
            state: a :meth:`state_dict` to resume from (None: start at position 0).
        """
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}.")
        self.dataset = DatasetFromList(list(dataset), copy=False, serialize=serialize)
        self.sampler = sampler
        self.mapper = mapper
        self.batch_size = int(batch_size)
        self.aspect_ratio_grouping = bool(aspect_ratio_grouping)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.rank = int(rank)
        self._state = self._checked_state(
            state if state is not None else self.state_at_iteration(0)
        )

    @property
    def _num_buckets(self) -> int:
        return ORIENTATION_BUCKETS if self.aspect_ratio_grouping else 1

    def _checked_state(self, state: Dict) -> Dict:
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("next_position"), int)
            or len(state.get("buckets", ())) != self._num_buckets
        ):
            raise ValueError(
                f"Not a data loader state of this configuration (aspect-ratio grouping "
                f"{self.aspect_ratio_grouping}: {self._num_buckets} bucket(s)): {state!r:.200}. "
                "Was DATALOADER.ASPECT_RATIO_GROUPING changed since the checkpoint was written?"
            )
        buckets = [[(int(p), int(i)) for p, i in bucket] for bucket in state["buckets"]]
        return {"next_position": state["next_position"], "buckets": buckets}

    @classmethod
    def at_iteration(cls, *args, start_iter: int = 0, **kwargs) -> "ResumableTrainLoader":
        """
        A loader whose stream starts at iteration ``start_iter`` with empty buckets (position
        ``start_iter * batch_size``) — for checkpoints that hold no loader state. Exact without
        aspect-ratio grouping; with it, the batches are regrouped from there.
        """
        loader = cls(*args, **kwargs)
        loader.load_state_dict(loader.state_at_iteration(start_iter))
        return loader

    def state_at_iteration(self, iteration: int) -> Dict:
        """The state of a stream restarted at ``iteration`` (position ``iteration *
        batch_size``)."""
        return {
            "next_position": int(iteration) * self.batch_size,
            "buckets": [[] for _ in range(self._num_buckets)],
        }

    def load_state_dict(self, state: Dict) -> None:
        """Go on from ``state`` (a :meth:`state_dict`) at the next ``iter()``."""
        self._state = self._checked_state(state)

    def state_dict(self) -> Dict:
        """
        The position to go on from and the (position, index) of the images waiting in each bucket,
        as of the last batch yielded. JSON-able.
        """
        return {
            "next_position": self._state["next_position"],
            "buckets": [[list(e) for e in bucket] for bucket in self._state["buckets"]],
        }

    def _bucket_of(self, mapped: dict) -> int:
        return orientation_bucket(mapped) if self.aspect_ratio_grouping else 0

    def __len__(self):
        raise TypeError("ResumableTrainLoader is infinite.")

    def __iter__(self):
        # Images waiting in the buckets at the state's batch: mapped again, with their own seeds,
        # and grouped again in stream order (each bucket's order, which is also stream order).
        buckets: List[List] = [[] for _ in range(self._num_buckets)]
        for position, index in sorted(e for bucket in self._state["buckets"] for e in bucket):
            mapped = map_at_position(
                self.dataset, self.mapper, index, position, self.seed, self.rank
            )
            buckets[self._bucket_of(mapped)].append((position, index, mapped))
        stream = _PositionedStream(
            self.dataset,
            self.sampler,
            self.mapper,
            self.seed,
            self.rank,
            self._state["next_position"],
        )
        batches = torchdata.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            # its own generator: creating the iterator draws a base seed, which would otherwise
            # come from the global generator in the middle of a (seeded) training step
            generator=torch.Generator().manual_seed(self.seed),
        )
        for position, index, mapped in batches:
            if mapped is None:  # the mapper rejected the image: skipped, as it would be again
                continue
            bucket = buckets[self._bucket_of(mapped)]
            bucket.append((position, index, mapped))
            if len(bucket) == self.batch_size:
                batch = [m for _, _, m in bucket]
                del bucket[:]
                self._state = {
                    "next_position": position + 1,
                    "buckets": [[(p, i) for p, i, _ in b] for b in buckets],
                }
                yield batch
