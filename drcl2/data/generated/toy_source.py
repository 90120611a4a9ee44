"""
A generated, deterministic, class-balanced *classification* set: the toy stand-in for ImageNet.

The paper starts 2DRCL pre-training from supervised ImageNet weights; no weights can be downloaded
here, so the toy backbone is first trained to recognise objects on this set
(``python -m drcl2.tools.source_pretrain``). Its classes are disjoint from the toy detection
classes (:data:`drcl2.data.generated.toy_lvis.TOY_CLASSES`, ten *solid* shapes in red / green / blue): ten
other shapes times five surface patterns (stripes, checks, dots, two halves, outline only), each
pattern in its own hue family. What transfers is the low-level statistics: the toy set's cluttered
backgrounds (the same renderer), its object sizes (20-48 px here, 16-44 px there), hard polygon
edges.

Like ImageNet's, the images are object-centric: by default 64 x 64 px with one object of the image's
class (``max_objects_per_image`` allows more); the label is that class. Both choices are there so
that a from-scratch ResNet-18 leaves chance within a CPU budget: with random hues, and on 96-128 px
images with 1-3 smaller objects, runs of 300 iterations at batch 32 stayed at chance (2%; measured
at lr 0.02, before the lower default lr of the source pre-training was found). Files::

    ROOT/toy_source/
        train/<class>/<image_id>.png   val/<class>/<image_id>.png   (torchvision ImageFolder layout)
        toy_source_train.json          toy_source_val.json          (the index read by drcl2)

As for the toy LVIS set, :func:`toy_source_layout` decides every object from the seed alone, and
:func:`generate_toy_source` renders it; the same spec gives byte-identical files.
"""
import colorsys
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw

# One renderer for the backgrounds and one placement rule, shared with the detection set, so that
# what the backbone learns to ignore here is what it must ignore there.
from .toy_lvis import _box_occlusion, _render_background

__all__ = [
    "ToySourceSpec",
    "SOURCE_SHAPES",
    "SOURCE_PATTERNS",
    "SOURCE_CLASSES",
    "toy_source_layout",
    "generate_toy_source",
    "ensure_toy_source",
    "toy_source_paths",
    "load_toy_source",
]

SOURCE_SHAPES = (
    "heart", "crescent", "ring", "trapezoid", "octagon",
    "ell", "tee", "semicircle", "parallelogram", "zigzag",
)  # fmt: skip
SOURCE_PATTERNS = ("striped", "checked", "dotted", "twotone", "outlined")
# Each pattern's main colour lies near its own hue, away from the toy classes' red / green / blue
# (0, 0.33, 0.62): colour is the cue a network picks up first, so that training leaves chance within
# a CPU budget, and shape and texture are left to separate the ten classes of each pattern.
PATTERN_HUES = {"striped": 0.15, "checked": 0.78, "dotted": 0.08, "twotone": 0.5, "outlined": 0.9}
SOURCE_CLASSES = tuple(f"{pattern}_{shape}" for shape in SOURCE_SHAPES for pattern in SOURCE_PATTERNS)

DIRNAME = "toy_source"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ToySourceSpec:
    """What to generate. The defaults: 50 classes x (80 train + 20 val) images, about 15 s."""

    seed: int = 0
    num_train_per_class: int = 80
    num_val_per_class: int = 20
    min_image_size: int = 64  # sides drawn from [min, max] independently
    max_image_size: int = 64
    max_objects_per_image: int = 1  # 1..max objects, all of the image's class
    min_object_radius: float = 10.0  # objects of 20-48 px, about the toy LVIS set's 16-44 px
    max_object_radius: float = 24.0
    max_box_occlusion: float = 0.25  # at most this fraction of an earlier box may be covered


def toy_source_paths(root: str) -> Dict[str, str]:
    """Files of the source set under ``root`` (the ``$DETECTRON2_DATASETS`` folder)."""
    base = os.path.join(root, DIRNAME)
    paths = {"image_root": base}
    for split in SPLITS:
        paths[f"{split}_json"] = os.path.join(base, f"toy_source_{split}.json")
    return paths


# ---------------------------------------------------------------------------------------------------
# Layout: the class, size and objects of every image; no pixels.
# ---------------------------------------------------------------------------------------------------
def toy_source_layout(spec: ToySourceSpec, split: str) -> List[Dict[str, Any]]:
    """
    The images of ``split``, decided from the seed alone: exactly ``num_<split>_per_class`` images
    of every class, in a seeded random order.

    Returns:
        list of ``{"id", "label" (index into SOURCE_CLASSES), "width", "height", "objects"}``;
        each object is ``{"center": (x, y), "radius", "angle"}``, in drawing order.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown toy source split '{split}'; expected one of {SPLITS}.")
    if spec.min_image_size < 2 * spec.max_object_radius:
        raise ValueError(
            f"ToySourceSpec: min_image_size ({spec.min_image_size}) must be at least twice "
            f"max_object_radius ({spec.max_object_radius}) so that every object fits."
        )
    rng = random.Random(f"toy-source-layout-{spec.seed}-{split}")
    per_class = spec.num_train_per_class if split == "train" else spec.num_val_per_class
    labels = [c for c in range(len(SOURCE_CLASSES)) for _ in range(per_class)]
    rng.shuffle(labels)
    first_id = 1 if split == "train" else 1_000_001
    images = []
    for i, label in enumerate(labels):
        width = rng.randint(spec.min_image_size, spec.max_image_size)
        height = rng.randint(spec.min_image_size, spec.max_image_size)
        objects, boxes = [], []
        for _ in range(rng.randint(1, spec.max_objects_per_image)):
            for _ in range(20):  # a few tries to place it without hiding earlier objects
                radius = rng.uniform(spec.min_object_radius, spec.max_object_radius)
                cx = rng.uniform(radius, width - radius)
                cy = rng.uniform(radius, height - radius)
                box = (cx - radius, cy - radius, cx + radius, cy + radius)
                if all(_box_occlusion(b, box) <= spec.max_box_occlusion for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            objects.append({"center": (cx, cy), "radius": radius, "angle": rng.uniform(0, 2 * math.pi)})
        images.append({"id": first_id + i, "label": label, "width": width, "height": height, "objects": objects})
    return images


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
def _arc(cx: float, cy: float, r: float, a0: float = 0.0, a1: float = 2 * math.pi, n: int = 24):
    return [(cx + r * math.cos(a0 + (a1 - a0) * k / n), cy + r * math.sin(a0 + (a1 - a0) * k / n))
            for k in range(n + (a1 - a0 < 2 * math.pi))]


def _zigzag() -> List[Tuple[float, float]]:
    xs = np.linspace(-1.0, 1.0, 5)
    ys = [(-0.45 if k % 2 == 0 else 0.45) for k in range(5)]
    half = 0.28  # half of the stroke's vertical thickness
    return [(x, y - half) for x, y in zip(xs, ys)] + [(x, y + half) for x, y in reversed(list(zip(xs, ys)))]


def _heart() -> List[Tuple[float, float]]:
    pts = []
    for k in range(32):
        t = 2 * math.pi * k / 32
        x = math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16
        pts.append((x, y + 0.15))  # +0.15 centres its box vertically
    return pts


# Each shape, in a unit frame (it fits the unit disc), as polygons drawn in order with fill 1 (solid)
# or 0 (a hole: ring, crescent).
_SHAPE_PARTS = {
    "heart": [(_heart(), 1)],
    "crescent": [(_arc(0, 0, 1.0), 1), (_arc(0.45, 0, 0.85), 0)],
    "ring": [(_arc(0, 0, 1.0), 1), (_arc(0, 0, 0.55), 0)],
    "trapezoid": [([(-1, 0.55), (1, 0.55), (0.45, -0.55), (-0.45, -0.55)], 1)],
    "octagon": [([(math.cos(math.pi / 8 + k * math.pi / 4), math.sin(math.pi / 8 + k * math.pi / 4))
                  for k in range(8)], 1)],
    "ell": [([(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.7, 0.45), (0.7, 1), (-0.7, 1)], 1)],
    "tee": [([(-1, -0.9), (1, -0.9), (1, -0.35), (0.28, -0.35), (0.28, 1), (-0.28, 1), (-0.28, -0.35),
              (-1, -0.35)], 1)],
    "semicircle": [([(x, y + 0.5) for x, y in _arc(0, 0, 1.0, math.pi, 2 * math.pi)], 1)],
    "parallelogram": [([(-1, 0.5), (0.35, 0.5), (1, -0.5), (-0.35, -0.5)], 1)],
    "zigzag": [(_zigzag(), 1)],
}


def _shape_mask(shape: str, size: Tuple[int, int], cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """uint8[H, W] mask (1 inside) of ``shape`` with radius ``r`` centred at (cx, cy), rotated."""
    ca, sa = math.cos(angle), math.sin(angle)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in _SHAPE_PARTS[shape]:
        draw.polygon([(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in polygon], fill=fill)
    return np.asarray(mask, dtype=np.uint8)


def _two_colours(rng: np.random.Generator, hue: float) -> Tuple[np.ndarray, np.ndarray]:
    """A saturated colour near ``hue`` (in [0, 1)) and a clearly different second one of any hue."""
    hue = (hue + rng.uniform(-0.03, 0.03)) % 1.0
    first = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    second = colorsys.hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1.0, rng.uniform(0.4, 1.0), rng.uniform(0.25, 1.0))
    return np.array(first) * 255, np.array(second) * 255


def _pattern_colours(pattern: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """
    Colours of ``pattern`` at the points with coordinates ``u``, ``v`` (float[P], pixels, in the
    pattern's own rotated frame centred on the object): float[P, 3].
    """
    a, b = _two_colours(rng, PATTERN_HUES[pattern])
    if pattern == "outlined":
        return np.broadcast_to(a, (len(u), 3))
    if pattern == "striped":
        period = rng.uniform(5.0, 8.0)
        second = np.floor(u / (period / 2)) % 2 == 1
    elif pattern == "checked":
        cell = rng.uniform(3.5, 6.0)
        second = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    elif pattern == "dotted":
        period = rng.uniform(5.0, 8.0)
        du = u - period * np.round(u / period)
        dv = v - period * np.round(v / period)
        second = du * du + dv * dv <= (0.3 * period) ** 2
    elif pattern == "twotone":
        second = u > 0
    else:
        raise ValueError(f"Unknown source pattern '{pattern}'; expected one of {SOURCE_PATTERNS}.")
    return np.where(second[:, None], b, a)


def _render_image(spec: ToySourceSpec, split: str, layout: Dict[str, Any]) -> Image.Image:
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), layout["id"]])
    img = _render_background(rng, layout["width"], layout["height"], 1.0)  # clutter at the toy set's scale
    pixels = np.asarray(img).copy()
    pattern, shape = SOURCE_CLASSES[layout["label"]].split("_")
    for obj in layout["objects"]:
        (cx, cy), radius = obj["center"], obj["radius"]
        mask = _shape_mask(shape, img.size, cx, cy, radius, obj["angle"])
        if pattern == "outlined":
            # a 2-3 px border; the background shows through the middle
            eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=int(rng.integers(2, 4)))
            mask = mask & (eroded == 0)
        ys, xs = np.nonzero(mask)
        theta = rng.uniform(0, math.pi)
        u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
        v = (ys - cy) * math.cos(theta) - (xs - cx) * math.sin(theta)
        colours = _pattern_colours(pattern, u, v, rng)
        # a little per-pixel noise, so that the colours are not flat (as the background's)
        colours = colours + rng.normal(0, 6, size=colours.shape)
        pixels[ys, xs] = np.clip(colours, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _render_split(spec: ToySourceSpec, split: str, out_dir: str) -> Dict[str, Any]:
    images = []
    for name in SOURCE_CLASSES:
        os.makedirs(os.path.join(out_dir, split, name), exist_ok=True)
    for layout in toy_source_layout(spec, split):
        file_name = f"{split}/{SOURCE_CLASSES[layout['label']]}/{layout['id']:07d}.png"
        _render_image(spec, split, layout).save(os.path.join(out_dir, file_name))
        images.append(
            {
                "image_id": layout["id"],
                "file_name": file_name,
                "height": layout["height"],
                "width": layout["width"],
                "label": layout["label"],
            }
        )
    return {
        "info": {"description": f"drcl2 toy source classification set ({split})", "spec": asdict(spec)},
        "classes": list(SOURCE_CLASSES),
        "images": images,
    }


def generate_toy_source(root: str, spec: ToySourceSpec = ToySourceSpec()) -> Dict[str, str]:
    """
    Render the source set into ``root/toy_source/`` and return its paths (:func:`toy_source_paths`).
    The same spec gives byte-identical files.

    Written to a staging folder and moved into place at the end, so an interrupted run or several
    processes generating at once never leave a half-written set; an existing ``root/toy_source`` is
    never overwritten.
    """
    paths = toy_source_paths(root)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DIRNAME}-", dir=root)
    try:
        for split in SPLITS:
            index = _render_split(spec, split, staging)
            with open(os.path.join(staging, f"toy_source_{split}.json"), "w") as f:
                json.dump(index, f, sort_keys=True, separators=(",", ":"))
        try:
            os.rename(staging, paths["image_root"])
        except OSError:
            if not os.path.isfile(paths["val_json"]):
                raise
            # another process finished first: keep its (identical) set
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def ensure_toy_source(root: str, spec: ToySourceSpec = ToySourceSpec()) -> Dict[str, str]:
    """
    Generate the source set under ``root`` unless it is already there; return its paths.

    Raises:
        FileExistsError: ``root/toy_source`` exists without both index files.
        ValueError: the set on disk was generated with another spec.
    """
    paths = toy_source_paths(root)
    if all(os.path.isfile(paths[f"{split}_json"]) for split in SPLITS):
        with open(paths["train_json"]) as f:
            on_disk = json.load(f)["info"].get("spec")
        if on_disk != asdict(spec):
            raise ValueError(
                f"'{paths['image_root']}' was generated with {on_disk}, not with the requested "
                f"{asdict(spec)}. Generate the other spec under another --root, or delete the folder."
            )
        return paths
    if os.path.exists(paths["image_root"]):
        raise FileExistsError(
            f"'{paths['image_root']}' exists but holds no complete toy source set (its index files "
            "are missing). It is not drcl2's to overwrite: move it away, or point "
            "$DETECTRON2_DATASETS elsewhere, and the set will be generated again."
        )
    return generate_toy_source(root, spec)


def load_toy_source(json_file: str, image_root: str) -> List[Dict[str, Any]]:
    """
    The dataset dicts of one split: ``{"file_name" (absolute), "image_id", "height", "width",
    "label" (index into the file's ``classes``)}``.
    """
    with open(json_file) as f:
        index = json.load(f)
    dicts = []
    for record in index["images"]:
        record = dict(record)
        record["file_name"] = os.path.join(image_root, record["file_name"])
        dicts.append(record)
    return dicts
