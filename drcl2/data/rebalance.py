"""
Dynamic rebalancing (DRB): class statistics, repeat factors and class weights that move from
image-level to instance-level resampling as the progress λ goes from 0 to 1 (docs/method.md, "DRB").

With f_c^img the fraction of images that contain class c, f_c^ins the fraction of all instances
that are of class c and t the repeat threshold:

    r_c^img = max(1, sqrt(t / f_c^img))                       LVIS repeat-factor sampling
    r_c^ins = max(1, sqrt(t / sqrt(f_c^img * f_c^ins)))       instance-aware RFS
    r_I(λ)  = (1 - λ) max_{c in I} r_c^img + λ max_{c in I} r_c^ins     (images without
              annotations: 1)
    w_c(λ)  = (r_c^ins)^λ                                     instance selection inside an image

At λ = 0, ``r_I`` is exactly detectron2's
``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``.

Everything here is a pure function of the dataset dicts and works without a model. The dataset
dicts are read once into flat arrays (one class id per instance); all per-class and per-image
quantities are then vectorised (bincount / segment max), which keeps LVIS-scale set-up fast.
"""

import itertools
import math
from operator import itemgetter
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "ClassStatistics",
    "class_statistics",
    "repeat_factors",
    "class_weights",
    "sample_instances",
    "instance_class_weights",
    "RebalanceSchedule",
    "build_rebalance_schedule",
    "chunked_lambda",
]


class ClassStatistics(NamedTuple):
    """Per-class statistics of a training set: ``f_img, f_ins = class_statistics(...)``."""

    image_fraction: torch.Tensor
    """Tensor[C] float64: f_c^img, the fraction of images that contain class c."""
    instance_fraction: torch.Tensor
    """Tensor[C] float64: f_c^ins, the fraction of all instances that are of class c."""


def _check_dataset(dataset_dicts) -> None:
    if dataset_dicts is None or len(dataset_dicts) == 0:
        raise ValueError("The dataset is empty: rebalancing needs at least one image.")


def _check_repeat_thresh(repeat_thresh) -> float:
    repeat_thresh = float(repeat_thresh)
    if not (repeat_thresh > 0 and math.isfinite(repeat_thresh)):
        raise ValueError(
            f"repeat_thresh must be a positive, finite fraction of images; got {repeat_thresh}."
        )
    return repeat_thresh


def _check_lam(lam) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1]; got {lam}.")
    return lam


def _flatten(
    dataset_dicts, num_classes: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray, int]:
    """
    Read the class ids of a list of detectron2 dataset dicts into flat arrays.

    Returns:
        counts (ndarray[N] int64): number of annotations of each image.
        classes (ndarray[M] int64): ``category_id`` of every annotation, image after image.
        num_classes (int): ``num_classes`` if given, else ``max(category_id) + 1``.
    """
    _check_dataset(dataset_dicts)
    # The one Python-level pass over the annotations; everything after it is vectorised.
    anns = [d.get("annotations") or () for d in dataset_dicts]
    counts = np.fromiter(map(len, anns), dtype=np.int64, count=len(anns))
    try:
        classes = np.fromiter(
            map(itemgetter("category_id"), itertools.chain.from_iterable(anns)),
            dtype=np.int64,
            count=int(counts.sum()),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            "Rebalancing needs integer (contiguous) 'category_id's in the dataset dicts, as "
            f"detectron2's dataset loaders produce: {e}"
        ) from e
    if classes.size and classes.min() < 0:
        raise ValueError(f"Negative category_id {int(classes.min())} in the dataset dicts.")
    max_id = int(classes.max()) if classes.size else -1
    if num_classes is None:
        num_classes = max_id + 1
    elif max_id >= num_classes:
        raise ValueError(f"category_id {max_id} is out of range for num_classes={num_classes}.")
    return counts, classes, int(num_classes)


def _class_statistics(counts, classes, num_classes):
    """f_img, f_ins as float64 ndarrays [C] from the flat arrays of :func:`_flatten`."""
    num_images = counts.size
    # Images containing class c = number of distinct (image, class) pairs. Image ids are sorted
    # already, so a stable sort of image * C + class only reorders inside each image (cheap).
    image_ids = np.repeat(np.arange(num_images, dtype=np.int64), counts)
    keys = np.sort(image_ids * num_classes + classes, kind="stable")
    first = np.ones(keys.size, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    image_count = np.bincount(keys[first] % num_classes, minlength=num_classes)
    instance_count = np.bincount(classes, minlength=num_classes)
    f_img = image_count / num_images
    f_ins = instance_count / max(classes.size, 1)
    return f_img, f_ins


def _class_factors(f_img, f_ins, repeat_thresh):
    """r_c^img, r_c^ins as float64 ndarrays [C]; classes absent from the data get 1."""
    present = f_img > 0
    r_img = np.ones_like(f_img)
    r_ins = np.ones_like(f_img)
    # Same double-precision operations as detectron2 (t / f, sqrt, max with 1), so the λ = 0
    # factors match its RepeatFactorTrainingSampler bit for bit.
    r_img[present] = np.maximum(1.0, np.sqrt(repeat_thresh / f_img[present]))
    r_ins[present] = np.maximum(
        1.0, np.sqrt(repeat_thresh / np.sqrt(f_img[present] * f_ins[present]))
    )
    return r_img, r_ins


def _image_factors(counts, classes, class_factors):
    """
    Segment max over each image's instances of per-class factors.

    Args:
        counts (ndarray[N]), classes (ndarray[M]): as returned by :func:`_flatten`.
        class_factors (ndarray[C, K]): K factor sets per class.
    Returns:
        ndarray[N, K] float64: max over the classes of each image; 1 for images without annotations.
    """
    out = np.ones((counts.size, class_factors.shape[1]), dtype=np.float64)
    nonempty = counts > 0
    if classes.size:
        starts = np.cumsum(counts) - counts
        # reduceat over the starts of the non-empty images: each segment runs to the next
        # non-empty image's start, i.e. exactly over this image's instances.
        for k in range(class_factors.shape[1]):  # 1-D reduceat is ~2x faster than axis=0 on [M, K]
            out[nonempty, k] = np.maximum.reduceat(class_factors[classes, k], starts[nonempty])
    return out


def image_repeat_factor_sets(dataset_dicts, repeat_thresh: float = 0.001):
    """
    Both per-image factor sets of DRB, from one pass over the annotations.

    Returns:
        ndarray[N] float64: max_{c in I} r_c^img (detectron2's RFS factors, before float32 cast).
        ndarray[N] float64: max_{c in I} r_c^ins.
        so that r_I(λ) = (1 - λ) * first + λ * second.
    """
    repeat_thresh = _check_repeat_thresh(repeat_thresh)
    counts, classes, num_classes = _flatten(dataset_dicts)
    f_img, f_ins = _class_statistics(counts, classes, num_classes)
    r_img, r_ins = _class_factors(f_img, f_ins, repeat_thresh)
    both = _image_factors(counts, classes, np.stack([r_img, r_ins], axis=1))
    return both[:, 0], both[:, 1]


def mix_repeat_factors(
    image_level: np.ndarray, instance_level: np.ndarray, lam: float
) -> np.ndarray:
    """
    r_I(λ) = (1 - λ) image_level + λ instance_level, computed in float64 and returned as an
    ndarray[N] float32 (detectron2's dtype for repeat factors). λ = 0 and 1 return the factor sets
    exactly.
    """
    if lam == 0.0:
        mixed = image_level
    elif lam == 1.0:
        mixed = instance_level
    else:
        mixed = (1.0 - lam) * image_level + lam * instance_level
    return mixed.astype(np.float32)


def class_statistics(
    dataset_dicts: List[dict], num_classes: Optional[int] = None
) -> ClassStatistics:
    """
    Per-class image and instance fractions of a training set.

    Args:
        dataset_dicts (list[dict]): detectron2 dataset dicts; ``annotations[*]["category_id"]`` are
            contiguous class ids in ``[0, num_classes)``.
        num_classes (int or None): C; default ``max(category_id) + 1``.

    Returns:
        ClassStatistics: ``(image_fraction, instance_fraction)``, each Tensor[C] float64 —
        f_c^img = #images containing c / #images, f_c^ins = #instances of c / #instances.
    """
    counts, classes, num_classes = _flatten(dataset_dicts, num_classes)
    f_img, f_ins = _class_statistics(counts, classes, num_classes)
    return ClassStatistics(torch.from_numpy(f_img), torch.from_numpy(f_ins))


def repeat_factors(
    dataset_dicts: List[dict], repeat_thresh: float = 0.001, lam: float = 0.0
) -> torch.Tensor:
    """
    Per-image repeat factors r_I(λ) = (1 - λ) max_{c in I} r_c^img + λ max_{c in I} r_c^ins.

    Args:
        dataset_dicts (list[dict]): detectron2 dataset dicts.
        repeat_thresh (float): t, the image-fraction threshold below which a class is repeated.
        lam (float): λ in [0, 1]; 0 = image-level (LVIS) RFS, 1 = instance-aware RFS.

    Returns:
        Tensor[N] float32: the repeat factor of each image (1.0 for images without annotations).
        At ``lam=0`` it equals detectron2's
        ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dataset_dicts, t)``
        element for element.
    """
    lam = _check_lam(lam)
    image_level, instance_level = image_repeat_factor_sets(dataset_dicts, repeat_thresh)
    return torch.from_numpy(mix_repeat_factors(image_level, instance_level, lam))


def class_weights(
    dataset_dicts: List[dict],
    repeat_thresh: float = 0.001,
    lam: float = 0.0,
    num_classes: Optional[int] = None,
) -> torch.Tensor:
    """
    Instance-selection weights w_c(λ) = (r_c^ins)^λ.

    Uniform (all 1) at λ = 0; at λ = 1 the instance-level repeat factors. Classes absent from the
    data get weight 1. As w_c(λ) = w_c(1)^λ, a caller that needs the weights at many λ computes
    ``class_weights(..., lam=1.0)`` once and raises it to the power λ.

    Args:
        dataset_dicts (list[dict]): detectron2 dataset dicts.
        repeat_thresh (float): t, as in :func:`repeat_factors`.
        lam (float): λ in [0, 1].
        num_classes (int or None): C; default ``max(category_id) + 1``.

    Returns:
        Tensor[C] float32: w_c(λ), all >= 1.
    """
    repeat_thresh = _check_repeat_thresh(repeat_thresh)
    lam = _check_lam(lam)
    counts, classes, num_classes = _flatten(dataset_dicts, num_classes)
    f_img, f_ins = _class_statistics(counts, classes, num_classes)
    _, r_ins = _class_factors(f_img, f_ins, repeat_thresh)
    return torch.from_numpy(np.power(r_ins, lam).astype(np.float32))


def sample_instances(
    gt_classes: torch.Tensor,
    class_weights: torch.Tensor,
    k: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """
    Draw k instances of an image without replacement, with probability proportional to the weight
    of each instance's class (:func:`instance_class_weights`: 1 for an unlabelled instance).

    Args:
        gt_classes (Tensor[R] int64): class id of each instance of the image; -1 (any negative
            id) for an unlabelled one (a proposal that matches no annotated box).
        class_weights (Tensor[C]): positive w_c, e.g. from :func:`class_weights`; on the same device
            as ``gt_classes``.
        k (int): number of instances to draw (>= 0).
        generator (torch.Generator or None): on the same device as ``gt_classes``.

    Returns:
        LongTensor[min(k, R)] on ``gt_classes.device``: indices into ``gt_classes``, in draw order;
        ``arange(R)`` when R <= k.
    """
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}.")
    num = gt_classes.numel()
    if num <= k:
        return torch.arange(num, device=gt_classes.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=gt_classes.device)
    probs = instance_class_weights(
        gt_classes, class_weights.to(device=gt_classes.device, dtype=torch.float32)
    )
    return torch.multinomial(probs, k, replacement=False, generator=generator)


def instance_class_weights(gt_classes: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """
    The weight of each instance's class, 1 for an unlabelled instance (negative class id).

    Args:
        gt_classes (Tensor[R] int64): class ids, negative for unlabelled instances.
        class_weights (Tensor[C]): w_c, on the device of ``gt_classes``.

    Returns:
        Tensor[R] of ``class_weights``'s dtype.
    """
    classes = gt_classes.long()
    weights = class_weights[classes.clamp(min=0)]
    return torch.where(classes >= 0, weights, torch.ones_like(weights))


class RebalanceSchedule:
    """
    The DRB progress λ: as a function of training progress, 0 until ``start``, rising to 1 at
    ``end`` (``start`` and ``end`` are fractions of the schedule), then 1; ``mode="linear"``: λ = s,
    ``mode="cosine"``: λ = (1 - cos(π s)) / 2, with s = (progress - start) / (end - start)
    (``start == end`` makes λ a step at ``start``).

    The λ of an iteration (:meth:`at`) is taken in chunks of ``chunk_iters`` iterations of a
    ``max_iter`` schedule: the value at the first iteration of the chunk. A run builds one schedule
    (:func:`build_rebalance_schedule`, drcl2's Trainer) and hands it to the sampler, the model and
    the ``drb/lambda`` log, so that all three use one λ per iteration.
    """

    MODES = ("linear", "cosine")

    def __init__(
        self,
        start: float = 0.0,
        end: float = 1.0,
        mode: str = "linear",
        max_iter: int = 1,
        chunk_iters: int = 1,
    ):
        start, end = float(start), float(end)
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(
                f"RebalanceSchedule: start and end are fractions of the schedule in [0, 1]; "
                f"got start={start}, end={end}."
            )
        if start > end:
            raise ValueError(f"RebalanceSchedule: start ({start}) must not exceed end ({end}).")
        if mode not in self.MODES:
            raise ValueError(
                f"RebalanceSchedule: unknown mode {mode!r}; expected one of {self.MODES}."
            )
        if int(max_iter) < 1 or int(chunk_iters) < 1:
            raise ValueError(
                f"RebalanceSchedule: max_iter and chunk_iters must be >= 1; got {max_iter}, "
                f"{chunk_iters}."
            )
        self.start, self.end, self.mode = start, end, mode
        self.max_iter, self.chunk_iters = int(max_iter), int(chunk_iters)

    @classmethod
    def from_config(cls, cfg) -> "RebalanceSchedule":
        """
        The schedule of ``DATALOADER.DRCL2.{START, END, MODE, CHUNK_ITERS}`` over
        ``SOLVER.MAX_ITER``; a bad value raises ValueError naming the config key.
        """
        s = cfg.DATALOADER.DRCL2
        if int(s.CHUNK_ITERS) < 1:
            raise ValueError(
                f"DATALOADER.DRCL2.CHUNK_ITERS = {s.CHUNK_ITERS}: must be an integer >= 1."
            )
        try:
            return cls(s.START, s.END, s.MODE, max(cfg.SOLVER.MAX_ITER, 1), s.CHUNK_ITERS)
        except ValueError as e:
            keys = (
                "DATALOADER.DRCL2.MODE"
                if s.MODE not in cls.MODES
                else "DATALOADER.DRCL2.{START, END}"
            )
            values = repr(s.MODE) if s.MODE not in cls.MODES else f"({s.START}, {s.END})"
            raise ValueError(f"{keys} = {values}: {e}") from e

    def lam(self, progress: float) -> float:
        """λ at ``progress`` (fraction of the schedule done; values outside [0, 1] are clamped)."""
        progress = min(max(float(progress), 0.0), 1.0)
        if progress < self.start:
            return 0.0
        if progress >= self.end:
            return 1.0
        s = (progress - self.start) / (self.end - self.start)
        if self.mode == "linear":
            return s
        return 0.5 * (1.0 - math.cos(math.pi * s))

    __call__ = lam

    def at(self, iteration: int) -> float:
        """The λ of ``iteration``: :meth:`lam` at the first iteration of its chunk
        (:func:`chunked_lambda`)."""
        return chunked_lambda(self.lam, iteration, self.max_iter, self.chunk_iters)

    def __repr__(self):
        return (
            f"RebalanceSchedule(start={self.start}, end={self.end}, mode={self.mode!r}, "
            f"max_iter={self.max_iter}, chunk_iters={self.chunk_iters})"
        )


def build_rebalance_schedule(cfg) -> Optional[RebalanceSchedule]:
    """
    The run's rebalancing schedule, built once (drcl2's Trainer) and handed to the sampler, the
    model and the ``drb/lambda`` log: for ``DATALOADER.SAMPLER_TRAIN
    "DynamicRepeatFactorTrainingSampler"`` or a DRCL2 model with ``MODEL.DRCL2.DRB.ENABLED``; None
    otherwise.
    """
    dynamic = cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler"
    drcl2_drb = cfg.MODEL.META_ARCHITECTURE == "DRCL2" and cfg.MODEL.DRCL2.DRB.ENABLED
    return RebalanceSchedule.from_config(cfg) if dynamic or drcl2_drb else None


def chunked_lambda(lam_of_progress, iteration: int, max_iter: int, chunk_iters: int) -> float:
    """
    The λ that the dynamic sampler uses for the images of ``iteration``: the schedule's value at
    the first iteration of its chunk, ``lam_of_progress(min(j * chunk_iters / max_iter, 1))`` for
    ``j = iteration // chunk_iters``. The sampler, the ``drb/lambda`` log and the reports all take
    λ from here, so what is logged is what was sampled.

    Args:
        lam_of_progress: λ as a function of progress in [0, 1] (e.g. ``RebalanceSchedule.lam``).
        iteration (int): the training iteration (>= 0).
        max_iter (int): length of the schedule.
        chunk_iters (int): iterations per chunk (>= 1).
    """
    start = int(iteration) - int(iteration) % int(chunk_iters)
    lam = float(lam_of_progress(min(start / max(int(max_iter), 1), 1.0)))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"The schedule gave λ={lam} at iteration {start}; λ must lie in [0, 1].")
    return lam
