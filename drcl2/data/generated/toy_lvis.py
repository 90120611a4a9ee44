"""
Generated, deterministic, long-tailed detection sets in LVIS v1 format: the demo and test set
(``lvis_v1_toy``) and a larger one for GPU runs (``lvis_v1_gen_large``), both described by a
:class:`ToyLVISSpec`.

Classes are coloured, patterned shapes (:mod:`drcl2.data.generated.toy_classes`). Two class
distributions:

* ``"zipf"`` (the toy set: 30 classes, 800 training images): each object's class is drawn from a
  Zipf-like distribution, so that by LVIS's rule on training image counts (rare <= 10 images,
  common 11-100, frequent > 100) the classes fall into all three groups.
* ``"lvis"`` (the large set: hundreds of classes): every class gets an exact number of training
  images, read off LVIS v1's own long tail at evenly spaced ranks
  (:func:`~drcl2.data.lvis_format.lvis_v1_rank_image_counts`), so the rare / common / frequent
  shares of the classes are LVIS's (337 / 461 / 405 of 1,203). The frequent counts are compressed
  towards 101 so that the set has about ``(1 + max_objects_per_image) / 2`` classes per image (LVIS
  v1: 3.6); rare and common counts are LVIS's own. Each class is then dealt to that many distinct
  images.

Images are PNGs or JPEGs with cluttered backgrounds, several objects each, some overlapping, objects
and clutter scaled with the image size; annotations carry polygon segmentations of the visible part
of each object, ``neg_category_ids`` (classes verified absent) and ``not_exhaustive_category_ids``
(a class with a drawn but unannotated instance), as in LVIS v1.

Generation happens in two steps so that a set can be registered without touching the disk:
:func:`toy_lvis_layout` decides, from the seed alone, which objects go where (this fixes the class
statistics; :func:`toy_lvis_categories` has them in milliseconds); :func:`generate_toy_lvis` renders
the images (in parallel for large sets) and writes the JSON files. The same spec gives the same
bytes, whatever the number of worker processes.
"""

import functools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ..lvis_format import COMMON_MAX_IMAGES, frequency_group, lvis_v1_rank_image_counts
from .toy_classes import COLOURS, MAX_TOY_CLASSES, paint_pattern, shape_polygon, toy_classes

logger = logging.getLogger(__name__)

__all__ = [
    "ToyLVISSpec",
    "TOY_CLASSES",
    "LVIS_GEN_LARGE",
    "GENERATED_SETS",
    "toy_lvis_layout",
    "toy_lvis_categories",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "toy_lvis_paths",
]

TOY_CLASSES = tuple(c.name for c in toy_classes(30))  # the toy set's class names

SPLITS = ("train", "val", "test")
# Per split: first image id, first annotation id (ids are unique across the splits).
_FIRST_IDS = {"train": (1, 1), "val": (1_000_001, 10_000_001), "test": (2_000_001, 20_000_001)}
_MAX_IMAGES = 999_999  # per split, so that image ids stay unique across the splits
_MAX_ANNOTATIONS = 9_999_999  # likewise for annotation ids
CLASS_DISTRIBUTIONS = ("zipf", "lvis")
IMAGE_FORMATS = ("png", "jpg")
_JPEG_QUALITY = 90
_CLUTTER_REFERENCE_SIZE = 128  # clutter sizes below are for 128 px images; larger images scale them
_PLACEMENT_TRIES = 20  # random placements tried per object before it is dropped ...
_SHRINKING_TRIES = 200  # ... or, where it must be placed ("lvis"), tried at shrinking sizes
# Sets of at least this many images are rendered by one process per CPU core by default.
_PARALLEL_FROM_IMAGES = 5000
# Rendering processes are spawned, never forked: generation may start inside a trainer that holds
# CUDA and thread pools (DatasetCatalog.get). Spawning costs one drcl2 import per process.
_MP_CONTEXT = "spawn"


@dataclass(frozen=True)
class ToyLVISSpec:
    """
    What to generate. The defaults give the demo set, ``lvis_v1_toy`` (30 classes, 800 / 200 / 400
    images <= 128 px; about 10 s to render on one core); :data:`LVIS_GEN_LARGE` is the GPU set.
    Bad values raise a ``ValueError`` naming the field.
    """

    seed: int = 0
    # folder under the dataset root, prefix of the annotation files and of the dataset names
    name: str = "lvis_v1_toy"
    num_classes: int = 30  # this many classes of drcl2.data.generated.toy_classes' vocabulary ...
    first_class: int = 0  # ... from this one on (30 or more: none of the toy set's classes)
    class_distribution: str = "zipf"  # "zipf" or "lvis" (LVIS v1's r/c/f shares; module docstring)
    num_train_images: int = 800
    num_val_images: int = 200
    # held-out split for reported results: drawn like val, from its own seeds (nothing is tuned on
    # it)
    num_test_images: int = 400
    min_image_size: int = 96  # shorter and longer sides are drawn from [min, max] independently
    max_image_size: int = 128
    image_format: str = (
        "png"  # "png" (lossless) or "jpg" (quality 90: ~7x smaller, faster to write)
    )
    max_objects_per_image: int = (
        5  # classes per image: 1..max (zipf), about (1 + max) / 2 on average (lvis)
    )
    # object radii, as fractions of max_image_size, so that objects scale with the images (8-22 px
    # at 128)
    min_object_scale: float = 0.0625
    max_object_scale: float = 0.171875
    zipf_exponent: float = (
        1.5  # "zipf": class c (by rank) has probability proportional to 1 / (c + 1)^s
    )
    # val and test mix in this much of a uniform class distribution, so every class has boxes there
    val_uniform_mix: float = 0.5
    not_exhaustive_prob: float = 0.1  # images with one drawn but unannotated instance
    max_box_occlusion: float = (
        0.25  # at most this fraction of an earlier box may be covered by a later one
    )
    max_total_box_occlusion: float = (
        math.inf
    )  # ... and by all later ones together (sum of the fractions)

    def __post_init__(self):
        def check(field, ok, what):
            if not ok:
                raise ValueError(
                    f"ToyLVISSpec.{field}: must be {what}; got {getattr(self, field)!r}."
                )

        check(
            "name",
            re.fullmatch(r"[A-Za-z0-9_\-]+", str(self.name)),
            "letters, digits, '_' or '-' (it names a folder)",
        )
        check(
            "first_class",
            0 <= self.first_class < MAX_TOY_CLASSES,
            f"in [0, {MAX_TOY_CLASSES - 1}] (the class vocabulary)",
        )
        check(
            "num_classes",
            1 <= self.num_classes <= MAX_TOY_CLASSES - self.first_class,
            f"in [1, {MAX_TOY_CLASSES} - first_class] (the class vocabulary)",
        )
        check(
            "class_distribution",
            self.class_distribution in CLASS_DISTRIBUTIONS,
            f"one of {CLASS_DISTRIBUTIONS}",
        )
        check("image_format", self.image_format in IMAGE_FORMATS, f"one of {IMAGE_FORMATS}")
        check("max_objects_per_image", self.max_objects_per_image >= 1, ">= 1")
        for split in SPLITS:
            field, n = f"num_{split}_images", getattr(self, f"num_{split}_images")
            # ids are unique across the splits (_FIRST_IDS)
            check(field, 1 <= n <= _MAX_IMAGES, f"in [1, {_MAX_IMAGES:,}]")
            check(
                field,
                n * (self.max_objects_per_image + 1) <= _MAX_ANNOTATIONS,
                f"at most {_MAX_ANNOTATIONS:,} / (max_objects_per_image + 1)",
            )
        check(
            "min_image_size",
            1 <= self.min_image_size <= self.max_image_size,
            ">= 1 and <= max_image_size",
        )
        check(
            "min_object_scale",
            0 < self.min_object_scale <= self.max_object_scale,
            "> 0 and <= max_object_scale",
        )
        check(
            "max_object_scale",
            2 * self.max_object_scale * self.max_image_size <= self.min_image_size,
            "at most min_image_size / (2 * max_image_size), so that the largest object fits the "
            "smallest image",
        )
        check("zipf_exponent", self.zipf_exponent >= 0, ">= 0")
        for field in ("val_uniform_mix", "not_exhaustive_prob"):
            check(field, 0 <= getattr(self, field) <= 1, "in [0, 1]")
        check("max_box_occlusion", 0 < self.max_box_occlusion <= 1, "in (0, 1]")
        check(
            "max_total_box_occlusion",
            self.max_total_box_occlusion >= self.max_box_occlusion,
            ">= max_box_occlusion",
        )
        if self.class_distribution == "lvis":
            _lvis_train_image_counts(self)  # raises if the images cannot hold LVIS's long tail


def toy_lvis_paths(root: str, spec: ToyLVISSpec = ToyLVISSpec()) -> Dict[str, str]:
    """Files of the generated set ``spec`` under ``root`` (the ``$DETECTRON2_DATASETS`` folder)."""
    base = os.path.join(root, spec.name)
    paths = {"image_root": base}
    for split in SPLITS:
        paths[f"{split}_json"] = os.path.join(base, "annotations", f"{spec.name}_{split}.json")
    return paths


def _num_images(spec: ToyLVISSpec, split: str) -> int:
    return {
        "train": spec.num_train_images,
        "val": spec.num_val_images,
        "test": spec.num_test_images,
    }[split]


# --------------------------------------------------------------------------------------------------
# Class frequencies
# --------------------------------------------------------------------------------------------------
def _class_ranks(spec: ToyLVISSpec) -> List[int]:
    """A fixed, seed-dependent assignment of long-tail ranks to classes, shared by all splits."""
    ranks = list(range(spec.num_classes))
    random.Random(f"toy-lvis-ranks-{spec.seed}").shuffle(ranks)
    return ranks


def _class_probabilities(spec: ToyLVISSpec, split: str) -> List[float]:
    """ "zipf": the probability of each class, per drawn object."""
    zipf = [1.0 / (rank + 1) ** spec.zipf_exponent for rank in _class_ranks(spec)]
    total = sum(zipf)
    probs = [z / total for z in zipf]
    if split != "train":
        mix = spec.val_uniform_mix
        probs = [(1 - mix) * p + mix / len(probs) for p in probs]
    return probs


def _lvis_train_image_counts(spec: ToyLVISSpec) -> np.ndarray:
    """
    "lvis": the number of training images of each class (int64[num_classes], by class index): LVIS
    v1's counts at evenly spaced ranks, the frequent ones (> 100) compressed towards 101 by one
    factor so that the split holds about ``(1 + max_objects_per_image) / 2`` classes per image.
    Raises ``ValueError`` when the training images cannot hold that long tail.
    """
    n, most = spec.num_train_images, spec.max_objects_per_image
    if n <= COMMON_MAX_IMAGES:
        raise ValueError(
            "ToyLVISSpec.num_train_images: class_distribution 'lvis' needs more than "
            f"{COMMON_MAX_IMAGES} training images (LVIS's frequent classes are in > "
            f"{COMMON_MAX_IMAGES}); got {n}."
        )
    curve = np.asarray(lvis_v1_rank_image_counts(spec.num_classes), dtype=np.int64)
    frequent = curve > COMMON_MAX_IMAGES
    floor = COMMON_MAX_IMAGES + 1
    fixed = curve[~frequent].sum() + floor * frequent.sum()
    spread = (curve[frequent] - floor).sum()
    alpha = max(0.0, (n * (1 + most) / 2 - fixed) / spread) if spread else 0.0
    counts = curve.copy()
    counts[frequent] = floor + np.round((curve[frequent] - floor) * alpha).astype(np.int64)
    counts = np.minimum(counts, n)
    if not n <= counts.sum() <= n * most:
        raise ValueError(
            f"ToyLVISSpec: {spec.num_classes} classes with LVIS's long tail need {counts.sum():,} "
            f"class-image pairs, which {n:,} training images of 1..{most} classes cannot hold: "
            "change num_train_images, max_objects_per_image or num_classes."
        )
    return counts[_class_ranks(spec)]


def _lvis_image_counts(spec: ToyLVISSpec, split: str) -> np.ndarray:
    """ "lvis": images per class in ``split``; val and test mix in ``val_uniform_mix`` of a uniform
    distribution (every class has at least one image there)."""
    train = _lvis_train_image_counts(spec)
    if split == "train":
        return train
    n, k = _num_images(spec, split), spec.num_classes
    probs = (1 - spec.val_uniform_mix) * train / train.sum() + spec.val_uniform_mix / k
    counts = np.clip(np.round(n * (1 + spec.max_objects_per_image) / 2 * probs), 1, n).astype(
        np.int64
    )
    # keep the split within 1..max classes per image
    while counts.sum() > n * spec.max_objects_per_image:
        counts[np.argmax(counts)] -= 1
    while counts.sum() < n:
        counts[np.argmin(counts)] += 1
    return counts


@functools.lru_cache(maxsize=8)
def _dealt_classes(spec: ToyLVISSpec, split: str) -> Tuple[Tuple[int, ...], ...]:
    """
    "lvis": the classes of every image of ``split`` (distinct within an image, in drawing order),
    such that class c is in exactly ``_lvis_image_counts(spec, split)[c]`` images and every image
    has 1..max_objects_per_image classes.

    Each image gets a capacity of 1..max_objects_per_image classes (1, plus the class-image pairs
    beyond one per image spread at random); classes, the most frequent first, then each take
    distinct images, drawn with probability proportional to the capacity they have left.
    """
    counts = _lvis_image_counts(spec, split)
    n, most = _num_images(spec, split), spec.max_objects_per_image
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), 7])
    extra = rng.choice(n * (most - 1), size=int(counts.sum()) - n, replace=False) // max(
        most - 1, 1
    )
    capacity = 1 + np.bincount(extra, minlength=n).astype(np.float64)
    images: List[List[int]] = [[] for _ in range(n)]
    for c in np.argsort(-counts, kind="stable"):
        eligible = np.flatnonzero(capacity > 0)
        if len(eligible) < counts[c]:
            raise RuntimeError(
                f"Toy LVIS generator: no {counts[c]} distinct images of {spec.name} {split} have "
                f"room left for class {c}; raise ToyLVISSpec.num_{split}_images or "
                "max_objects_per_image, or lower num_classes."
            )
        # weighted sampling without replacement (Efraimidis-Spirakis keys)
        keys = np.log(rng.random(len(eligible))) / capacity[eligible]
        chosen = eligible[np.argpartition(-keys, counts[c] - 1)[: counts[c]]]
        capacity[chosen] -= 1
        for i in chosen:
            images[i].append(int(c))
    return tuple(tuple(int(c) for c in rng.permutation(classes)) for classes in images)


# The set for GPU runs (configs/large/, configs/study/large.yaml): 300 classes in LVIS v1's shares
# (84 rare, 115 common, 101 frequent), 10,000 / 1,000 / 1,000 JPEGs of 320-480 px, objects 17-72 px
# in radius, 3.5 classes per image on average.
LVIS_GEN_LARGE = ToyLVISSpec(
    name="lvis_v1_gen_large",
    num_classes=300,
    class_distribution="lvis",
    num_train_images=10_000,
    num_val_images=1_000,
    num_test_images=1_000,
    min_image_size=320,
    max_image_size=480,
    image_format="jpg",
    max_objects_per_image=6,
    min_object_scale=0.035,
    max_object_scale=0.15,
    max_total_box_occlusion=0.4,
)

# The source set, the toy stand-in for ImageNet (or Objects365 before LVIS): 120 classes of the
# vocabulary disjoint from the toy set's 30 (classes 30-149: the toy shapes in other colours and
# patterns, and 6 other shapes), a flatter class distribution than the toy set's (zipf 0.5), ten
# times
# its training images, drawn by the same renderer. A detector trained on it gives the source
# initialisation of configs/study/toy_init.yaml (its ResNet only, as ImageNet weights).
TOY_SOURCE = ToyLVISSpec(
    name="lvis_v1_toy_source",
    seed=1,
    first_class=30,
    num_classes=120,
    num_train_images=8_000,
    num_val_images=500,
    num_test_images=200,
    zipf_exponent=0.5,
)

# The generated sets drcl2 registers (drcl2.data.datasets) and datasets/prepare_toy_lvis.py makes.
GENERATED_SETS = {"toy": ToyLVISSpec(), "large": LVIS_GEN_LARGE, "source": TOY_SOURCE}


# --------------------------------------------------------------------------------------------------
# Layout: classes, positions and sizes of every object; no pixels.
# --------------------------------------------------------------------------------------------------
def _box_occlusion(old: Tuple[float, ...], new: Tuple[float, ...]) -> float:
    """Fraction of box ``old`` (x0, y0, x1, y1) covered by box ``new``."""
    w = min(old[2], new[2]) - max(old[0], new[0])
    h = min(old[3], new[3]) - max(old[1], new[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / ((old[2] - old[0]) * (old[3] - old[1]))


def _place_object(rng, spec, width, height, boxes, covered, must_place):
    """
    Centre and radius of a new object that covers at most ``max_box_occlusion`` of each earlier box
    (and keeps their ``covered`` sums within ``max_total_box_occlusion``), or None after
    ``_PLACEMENT_TRIES`` tries. An object that ``must_place`` is then tried smaller and smaller
    (down to a quarter of its size), so that its class keeps its exact image count.
    """
    min_r = spec.min_object_scale * spec.max_image_size
    max_r = spec.max_object_scale * spec.max_image_size
    for attempt in range(_SHRINKING_TRIES if must_place else _PLACEMENT_TRIES):
        shrink = 1.0 - 0.75 * max(0, attempt - _PLACEMENT_TRIES) / _SHRINKING_TRIES
        radius = rng.uniform(min_r, max_r) * shrink
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        occlusion = [_box_occlusion(b, box) for b in boxes]
        if all(o <= spec.max_box_occlusion for o in occlusion) and all(
            c + o <= spec.max_total_box_occlusion for c, o in zip(covered, occlusion)
        ):
            for k, o in enumerate(occlusion):
                covered[k] += o
            return cx, cy, radius, box
    if must_place:
        raise RuntimeError(
            f"Toy LVIS generator: no room for an object in a {width}x{height} image of "
            f"{spec.name}; lower ToyLVISSpec.max_objects_per_image or max_object_scale, or raise "
            "max_box_occlusion."
        )
    return None


def toy_lvis_layout(spec: ToyLVISSpec, split: str) -> List[Dict[str, Any]]:
    """
    The objects of every image of ``split``, decided from the seed alone.

    Returns:
        list of image dicts ``{"id", "width", "height", "objects", "neg_category_ids",
        "not_exhaustive_category_ids"}``; each object is ``{"category": class index,
        "center": (x, y), "radius", "angle", "annotated": bool}``, in drawing order.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown toy LVIS split '{split}'; expected one of {SPLITS}.")
    rng = random.Random(f"toy-lvis-layout-{spec.seed}-{split}")
    lvis = spec.class_distribution == "lvis"
    dealt = _dealt_classes(spec, split) if lvis else None
    probs = None if lvis else _class_probabilities(spec, split)
    classes = list(range(spec.num_classes))
    first_id = _FIRST_IDS[split][0]

    images = []
    for i in range(_num_images(spec, split)):
        width = rng.randint(spec.min_image_size, spec.max_image_size)
        height = rng.randint(spec.min_image_size, spec.max_image_size)
        if lvis:
            wanted = list(dealt[i])
        else:
            wanted = rng.choices(
                classes, weights=probs, k=rng.randint(1, spec.max_objects_per_image)
            )
        objects, boxes, covered = [], [], []
        unannotated_class = None
        if rng.random() < spec.not_exhaustive_prob:
            # one more instance of an already present class is drawn but left unannotated
            unannotated_class = wanted[0]
            wanted = wanted + [unannotated_class]
        for j, category in enumerate(wanted):
            annotated = not (unannotated_class is not None and j == len(wanted) - 1)
            # "lvis" counts are exact by construction: no annotated object may be dropped
            placed = _place_object(
                rng, spec, width, height, boxes, covered, must_place=lvis and annotated
            )
            if placed is None:
                continue
            cx, cy, radius, box = placed
            boxes.append(box)
            covered.append(0.0)
            objects.append(
                {
                    "category": category,
                    "center": (cx, cy),
                    "radius": radius,
                    "angle": rng.uniform(0, 2 * math.pi),
                    "annotated": annotated,
                }
            )
        present = {o["category"] for o in objects}
        not_exhaustive = sorted({o["category"] for o in objects if not o["annotated"]})
        absent = [c for c in classes if c not in present]
        neg = sorted(rng.sample(absent, k=min(len(absent), rng.randint(2, 4))))
        images.append(
            {
                "id": first_id + i,
                "width": width,
                "height": height,
                "objects": objects,
                "neg_category_ids": [c + 1 for c in neg],
                "not_exhaustive_category_ids": [c + 1 for c in not_exhaustive],
            }
        )
    return images


def _train_class_counts(spec: ToyLVISSpec) -> Tuple[List[int], List[int]]:
    """Training images and annotated instances per class."""
    if spec.class_distribution == "lvis":
        # exact by construction: _dealt_classes gives class c to exactly this many distinct images
        # and toy_lvis_layout places each dealt class once, annotated (both raise otherwise), so the
        # counts are known without dealing or placing anything (milliseconds at import)
        counts = _lvis_train_image_counts(spec).tolist()
        return counts, counts
    image_count = [0] * spec.num_classes
    instance_count = [0] * spec.num_classes
    for img in toy_lvis_layout(spec, "train"):
        seen = set()
        for obj in img["objects"]:
            if obj["annotated"]:
                instance_count[obj["category"]] += 1
                seen.add(obj["category"])
        for c in seen:
            image_count[c] += 1
    return image_count, instance_count


def toy_lvis_categories(spec: ToyLVISSpec) -> List[Dict[str, Any]]:
    """
    LVIS v1 category entries of the set, with training ``image_count`` / ``instance_count`` and
    the ``frequency`` group (LVIS puts the training statistics in both the train and val files).
    """
    image_count, instance_count = _train_class_counts(spec)
    return [
        {
            "id": c + 1,
            "name": cls.name,
            "synonyms": [cls.name],
            "def": cls.definition,
            "synset": f"toy.{cls.name}.n.01",
            "image_count": image_count[c],
            "instance_count": instance_count[c],
            "frequency": frequency_group(image_count[c]),
        }
        for c, cls in enumerate(toy_classes(spec.num_classes, spec.first_class))
    ]


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def _render_background(
    rng: np.random.Generator, width: int, height: int, scale: float
) -> Image.Image:
    """
    A muted gradient with clutter: lines, dots and blocks of low-saturation colours, plus noise.
    Clutter sizes follow ``scale`` (the image size relative to 128 px; counts do not), so a larger
    image looks like a toy image zoomed in, as its objects do; the noise stays per pixel.
    """
    base = rng.uniform(70, 190, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = (
        np.linspace(0.0, 1.0, width)[None, :, None]
        if rng.random() < 0.5
        else (np.linspace(0.0, 1.0, height)[:, None, None])
    )
    pixels = np.broadcast_to(base + tilt * ramp, (height, width, 3)).copy()
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 30))):
        grey = rng.uniform(60, 200)
        colour = tuple(int(v) for v in np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.integers(3)
        if kind == 0:
            x1, y1 = x0 + rng.uniform(-40, 40) * scale, y0 + rng.uniform(-40, 40) * scale
            draw.line(
                [(x0, y0), (x1, y1)],
                fill=colour,
                width=max(1, round(int(rng.integers(1, 3)) * scale)),
            )
        elif kind == 1:
            s = rng.uniform(1, 3) * scale
            draw.ellipse([x0 - s, y0 - s, x0 + s, y0 + s], fill=colour)
        else:
            draw.rectangle(
                [x0, y0, x0 + rng.uniform(3, 14) * scale, y0 + rng.uniform(3, 14) * scale],
                fill=colour,
            )
    noisy = rng.normal(0, 6, size=(height, width, 3))
    noisy += np.asarray(img)
    return Image.fromarray(np.clip(noisy, 0, 255, out=noisy).astype(np.uint8))


def _mask_polygons(mask: np.ndarray) -> List[List[float]]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) >= 3:
            # contour points are pixel indices; +0.5 puts them on pixel centres
            polygons.append([round(float(v) + 0.5, 2) for v in contour.reshape(-1)])
    return polygons


def _render_image(spec: ToyLVISSpec, split: str, layout: Dict[str, Any]):
    """Pixels of one image and the visible-part mask of each of its objects."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), layout["id"]])
    scale = spec.max_image_size / _CLUTTER_REFERENCE_SIZE
    img = _render_background(rng, layout["width"], layout["height"], scale)
    classes = toy_classes(spec.num_classes, spec.first_class)
    masks = []
    for obj in layout["objects"]:
        cls = classes[obj["category"]]
        colour = tuple(
            int(v)
            for v in np.clip(np.array(COLOURS[cls.colour]) + rng.uniform(-20, 20, size=3), 0, 255)
        )
        polygon = shape_polygon(cls.shape, *obj["center"], obj["radius"], obj["angle"])
        shape_mask = Image.new("L", img.size, 0)
        ImageDraw.Draw(shape_mask).polygon(polygon, fill=1)
        shape_mask = np.asarray(shape_mask, dtype=np.uint8)
        for m in masks:  # the new object hides what it covers of earlier ones
            m[shape_mask > 0] = 0
        masks.append(shape_mask.copy())
        ImageDraw.Draw(img).polygon(polygon, fill=colour)
        paint_pattern(
            img, cls.pattern, shape_mask, colour, obj["center"], obj["radius"], obj["angle"], rng
        )
    return img, masks


def _render_annotated(spec: ToyLVISSpec, split: str, layout: Dict[str, Any], out_dir: str):
    """Render one image into ``out_dir``; return its LVIS image entry and annotations (without
    ids)."""
    file_name = f"{split}/{layout['id']:012d}.{spec.image_format}"
    img, masks = _render_image(spec, split, layout)
    if spec.image_format == "jpg":
        img.save(os.path.join(out_dir, file_name), quality=_JPEG_QUALITY)
    else:
        img.save(os.path.join(out_dir, file_name))
    annotations = []
    for obj, mask in zip(layout["objects"], masks):
        if not obj["annotated"]:
            continue
        polygons = _mask_polygons(mask)
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if not polygons or len(cols) == 0:
            raise RuntimeError(
                f"Toy LVIS generator: an object of image {layout['id']} is hidden completely; "
                f"lower ToyLVISSpec.max_box_occlusion (now {spec.max_box_occlusion}) or "
                f"max_total_box_occlusion (now {spec.max_total_box_occlusion})."
            )
        x0, y0 = int(cols[0]), int(rows[0])
        annotations.append(
            {
                "image_id": layout["id"],
                "category_id": obj["category"] + 1,
                "bbox": [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1],
                "area": int(mask.sum()),
                "segmentation": polygons,
            }
        )
    image = {
        "id": layout["id"],
        "file_name": file_name,
        "width": layout["width"],
        "height": layout["height"],
        "neg_category_ids": layout["neg_category_ids"],
        "not_exhaustive_category_ids": layout["not_exhaustive_category_ids"],
        "license": 1,
        "date_captured": "2024-01-01 00:00:00",
    }
    return image, annotations


def _render_chunk(spec: ToyLVISSpec, split: str, out_dir: str, layouts: Sequence[Dict[str, Any]]):
    """A worker's share of :func:`_render_split` (module level, so that it pickles)."""
    return [_render_annotated(spec, split, layout, out_dir) for layout in layouts]


def _render_split(spec: ToyLVISSpec, split: str, out_dir: str, categories, num_workers: int):
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    layouts = toy_lvis_layout(spec, split)
    if num_workers > 1:
        # every image depends on its layout alone, and results come back in image order, so the
        # files are the same as with one process
        size = max(1, math.ceil(len(layouts) / (num_workers * 8)))
        chunks = [layouts[i : i + size] for i in range(0, len(layouts), size)]
        with ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context(_MP_CONTEXT)
        ) as pool:
            parts = pool.map(functools.partial(_render_chunk, spec, split, out_dir), chunks)
            rendered = [image for part in parts for image in part]
    else:
        rendered = _render_chunk(spec, split, out_dir, layouts)
    images, annotations = [], []
    ann_id = _FIRST_IDS[split][1]
    for image, anns in rendered:
        for ann in anns:
            annotations.append({"id": ann_id, **ann})
            ann_id += 1
        images.append(image)
    return {
        "info": {
            "description": f"drcl2 toy LVIS v1 ({split}), generated with seed {spec.seed}",
            "version": "1.0",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0 (generated data)", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _write_split(
    spec: ToyLVISSpec, split: str, out_dir: str, categories, num_workers: int = 1
) -> None:
    """Render ``split`` into ``out_dir`` (``<split>/`` and ``annotations/<name>_<split>.json``)."""
    lvis_dict = _render_split(spec, split, out_dir, categories, num_workers)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    with open(os.path.join(out_dir, "annotations", f"{spec.name}_{split}.json"), "w") as f:
        json.dump(lvis_dict, f, sort_keys=True, separators=(",", ":"))


def _workers(spec: ToyLVISSpec, num_workers: Optional[int]) -> int:
    if num_workers is not None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1; got {num_workers}.")
        return num_workers
    total = sum(_num_images(spec, split) for split in SPLITS)
    return (os.cpu_count() or 1) if total >= _PARALLEL_FROM_IMAGES else 1


def generate_toy_lvis(
    root: str, spec: ToyLVISSpec = ToyLVISSpec(), num_workers: Optional[int] = None
) -> Dict[str, str]:
    """
    Render the set ``spec`` into ``root/<spec.name>/`` (``train/``, ``val/``, ``test/``,
    ``annotations/``) and return its paths (see :func:`toy_lvis_paths`). The same spec gives
    byte-identical files, with any ``num_workers`` (rendering processes; default: one per CPU core
    for sets of 5,000 images or more, else 1).

    The set is written to a temporary folder first and moved into place at the end, so that an
    interrupted run, or several processes generating at once, never leave a half-written set.
    An existing ``root/<spec.name>`` is kept as it is (it is never overwritten).
    """
    paths = toy_lvis_paths(root, spec)
    workers = _workers(spec, num_workers)
    images = sum(_num_images(spec, split) for split in SPLITS)
    logger.info(
        f"Generating the {spec.name} set ({images:,} images) into '{paths['image_root']}' "
        f"(first use; {workers} rendering process(es))"
    )
    os.makedirs(root, exist_ok=True)
    categories = toy_lvis_categories(spec)
    staging = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root)
    try:
        for split in SPLITS:
            _write_split(spec, split, staging, categories, workers)
        try:
            os.rename(staging, paths["image_root"])
        except OSError:
            if not all(os.path.isfile(paths[f"{split}_json"]) for split in SPLITS):
                raise
            # another process finished first: keep its (identical) set
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _add_split(root: str, spec: ToyLVISSpec, split: str, num_workers: int) -> None:
    """
    Add a missing ``split`` to an existing set (one generated before the split existed): its
    images move into place first and its annotation file last, so the file marks a complete split.
    """
    paths = toy_lvis_paths(root, spec)
    image_dir = os.path.join(paths["image_root"], split)
    if os.path.exists(image_dir):
        raise FileExistsError(
            f"'{image_dir}' exists but '{paths[f'{split}_json']}' does not: an interrupted or "
            f"foreign '{split}' split. It is not drcl2's to overwrite: move it away and the split "
            "will be generated again."
        )
    staging = tempfile.mkdtemp(prefix=f".{spec.name}-{split}-", dir=root)
    try:
        _write_split(spec, split, staging, toy_lvis_categories(spec), num_workers)
        os.rename(os.path.join(staging, split), image_dir)
        os.makedirs(os.path.dirname(paths[f"{split}_json"]), exist_ok=True)
        os.rename(
            os.path.join(staging, "annotations", f"{spec.name}_{split}.json"),
            paths[f"{split}_json"],
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_toy_lvis(
    root: str, spec: ToyLVISSpec = ToyLVISSpec(), num_workers: Optional[int] = None
) -> Dict[str, str]:
    """
    Generate the set ``spec`` under ``root`` unless it is already there; return its paths. A set
    made before the ``test`` split existed gets that split added (train and val stay untouched).
    """
    paths = toy_lvis_paths(root, spec)
    missing = [split for split in SPLITS if not os.path.isfile(paths[f"{split}_json"])]
    if not missing:
        return paths
    if not os.path.exists(paths["image_root"]):
        return generate_toy_lvis(root, spec, num_workers)
    if "train" in missing or "val" in missing:
        raise FileExistsError(
            f"'{paths['image_root']}' exists but holds no complete generated LVIS set (its "
            "annotation files are missing). It is not drcl2's to overwrite: move it away, or "
            "point $DETECTRON2_DATASETS elsewhere, and the set will be generated again."
        )
    for split in missing:
        _add_split(root, spec, split, _workers(spec, num_workers))
    return paths
