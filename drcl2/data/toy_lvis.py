"""
A generated, deterministic, long-tailed detection set in LVIS v1 format: the demo and test dataset.

Thirty classes (ten shapes x three colours) follow a Zipf-like distribution over the training images,
so that by LVIS's rule on training image counts they fall into all three frequency groups
(rare <= 10 images, common 11-100, frequent > 100). Images are small (<= 128 px) PNGs with cluttered
backgrounds, several objects each, some overlapping; annotations carry polygon segmentations of the
visible part of each object, ``neg_category_ids`` (classes verified absent) and
``not_exhaustive_category_ids`` (a class with a drawn but unannotated instance), as in LVIS v1.

Generation happens in two steps so that the dataset can be registered without touching the disk:
:func:`toy_lvis_layout` decides, from the seed alone and in milliseconds, which objects go where (this
fixes the class statistics); :func:`generate_toy_lvis` renders the images and writes the JSON files.
"""
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .lvis_format import frequency_group

__all__ = [
    "ToyLVISSpec",
    "TOY_CLASSES",
    "toy_lvis_layout",
    "toy_lvis_categories",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "toy_lvis_paths",
]

SHAPES = (
    "circle", "square", "triangle", "diamond", "pentagon",
    "hexagon", "star", "cross", "arrow", "ellipse",
)  # fmt: skip
COLOURS = {"red": (215, 45, 40), "green": (40, 170, 60), "blue": (45, 80, 215)}
TOY_CLASSES = tuple(f"{colour}_{shape}" for shape in SHAPES for colour in COLOURS)

DIRNAME = "lvis_v1_toy"
SPLITS = ("train", "val", "test")
# Per split: first image id, first annotation id (ids are unique across the splits).
_FIRST_IDS = {"train": (1, 1), "val": (1_000_001, 10_000_001), "test": (2_000_001, 20_000_001)}


@dataclass(frozen=True)
class ToyLVISSpec:
    """What to generate. The defaults give the demo set (about 3 s to render on one core)."""

    seed: int = 0
    num_train_images: int = 800
    num_val_images: int = 200
    # held-out split for reported results: drawn like val, from its own seeds (nothing is tuned on it)
    num_test_images: int = 400
    min_image_size: int = 96  # shorter and longer sides are drawn from [min, max] independently
    max_image_size: int = 128
    max_objects_per_image: int = 5
    min_object_radius: float = 8.0
    max_object_radius: float = 22.0
    zipf_exponent: float = 1.5  # class c (by rank) has probability proportional to 1 / (c + 1)^s
    # val and test mix in this much of a uniform class distribution, so every class has boxes there
    val_uniform_mix: float = 0.5
    not_exhaustive_prob: float = 0.1  # images with one drawn but unannotated instance
    max_box_occlusion: float = 0.25  # at most this fraction of an earlier box may be covered


def toy_lvis_paths(root: str) -> Dict[str, str]:
    """Files of the toy set under ``root`` (the ``$DETECTRON2_DATASETS`` folder)."""
    base = os.path.join(root, DIRNAME)
    paths = {"image_root": base}
    for split in SPLITS:
        paths[f"{split}_json"] = os.path.join(base, "annotations", f"lvis_v1_toy_{split}.json")
    return paths


# ---------------------------------------------------------------------------------------------------
# Layout: classes, positions and sizes of every object; no pixels.
# ---------------------------------------------------------------------------------------------------
def _class_probabilities(spec: ToyLVISSpec, split: str) -> List[float]:
    # A fixed, seed-dependent assignment of Zipf ranks to classes, shared by both splits.
    ranks = list(range(len(TOY_CLASSES)))
    random.Random(f"toy-lvis-ranks-{spec.seed}").shuffle(ranks)
    zipf = [1.0 / (rank + 1) ** spec.zipf_exponent for rank in ranks]
    total = sum(zipf)
    probs = [z / total for z in zipf]
    if split != "train":
        mix = spec.val_uniform_mix
        probs = [(1 - mix) * p + mix / len(probs) for p in probs]
    return probs


def _box_occlusion(old: Tuple[float, ...], new: Tuple[float, ...]) -> float:
    """Fraction of box ``old`` (x0, y0, x1, y1) covered by box ``new``."""
    w = min(old[2], new[2]) - max(old[0], new[0])
    h = min(old[3], new[3]) - max(old[1], new[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / ((old[2] - old[0]) * (old[3] - old[1]))


def toy_lvis_layout(spec: ToyLVISSpec, split: str) -> List[Dict[str, Any]]:
    """
    The objects of every image of ``split``, decided from the seed alone.

    Returns:
        list of image dicts ``{"id", "width", "height", "objects", "neg_category_ids",
        "not_exhaustive_category_ids"}``; each object is ``{"category": index into TOY_CLASSES,
        "center": (x, y), "radius", "angle", "annotated": bool}``, in drawing order.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown toy LVIS split '{split}'; expected one of {SPLITS}.")
    rng = random.Random(f"toy-lvis-layout-{spec.seed}-{split}")
    probs = _class_probabilities(spec, split)
    classes = list(range(len(TOY_CLASSES)))
    num_images = {"train": spec.num_train_images, "val": spec.num_val_images, "test": spec.num_test_images}[split]
    first_id = _FIRST_IDS[split][0]

    images = []
    for i in range(num_images):
        width = rng.randint(spec.min_image_size, spec.max_image_size)
        height = rng.randint(spec.min_image_size, spec.max_image_size)
        wanted = rng.choices(classes, weights=probs, k=rng.randint(1, spec.max_objects_per_image))
        objects, boxes = [], []
        unannotated_class = None
        if rng.random() < spec.not_exhaustive_prob:
            # one more instance of an already present class is drawn but left unannotated
            unannotated_class = wanted[0]
            wanted = wanted + [unannotated_class]
        for j, category in enumerate(wanted):
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
            objects.append(
                {
                    "category": category,
                    "center": (cx, cy),
                    "radius": radius,
                    "angle": rng.uniform(0, 2 * math.pi),
                    "annotated": not (unannotated_class is not None and j == len(wanted) - 1),
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


def toy_lvis_categories(spec: ToyLVISSpec) -> List[Dict[str, Any]]:
    """
    LVIS v1 category entries of the toy set, with training ``image_count`` / ``instance_count`` and
    the ``frequency`` group (LVIS puts the training statistics in both the train and val files).
    """
    image_count = [0] * len(TOY_CLASSES)
    instance_count = [0] * len(TOY_CLASSES)
    for img in toy_lvis_layout(spec, "train"):
        seen = set()
        for obj in img["objects"]:
            if obj["annotated"]:
                instance_count[obj["category"]] += 1
                seen.add(obj["category"])
        for c in seen:
            image_count[c] += 1
    categories = []
    for c, name in enumerate(TOY_CLASSES):
        colour, shape = name.split("_")
        categories.append(
            {
                "id": c + 1,
                "name": name,
                "synonyms": [name],
                "def": f"a {colour} {shape} (generated toy class)",
                "synset": f"toy.{name}.n.01",
                "image_count": image_count[c],
                "instance_count": instance_count[c],
                "frequency": frequency_group(image_count[c]),
            }
        )
    return categories


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if shape in ("circle", "ellipse"):
        n, radii, squash = 24, (1.0,), (0.55 if shape == "ellipse" else 1.0)
    else:
        n, radii, squash = {
            "square": (4, (1.0,), 1.0),
            "triangle": (3, (1.0,), 1.0),
            "diamond": (4, (1.0,), 0.6),
            "pentagon": (5, (1.0,), 1.0),
            "hexagon": (6, (1.0,), 1.0),
            "star": (10, (1.0, 0.45), 1.0),
            "cross": (12, (1.0, 0.42), 1.0),
            "arrow": (7, (1.0,), 1.0),
        }[shape]
    if shape == "cross":
        # a plus sign: 12 corners on two radii
        pts = []
        for k in range(4):
            a = angle + k * math.pi / 2
            for da, rr in ((-0.4, 1.0), (0.4, 1.0), (math.pi / 4, 0.42)):
                pts.append((rr * math.cos(a + da), rr * math.sin(a + da)))
    elif shape == "arrow":
        local = [(1.0, 0.0), (0.1, 0.8), (0.1, 0.35), (-1.0, 0.35), (-1.0, -0.35), (0.1, -0.35), (0.1, -0.8)]
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in local]
    else:
        pts = []
        for k in range(n):
            a = angle + 2 * math.pi * k / n
            rr = radii[k % len(radii)]
            x, y = rr * math.cos(a), rr * squash * math.sin(a)
            if squash != 1.0:  # rotate the squashed shape too
                x, y = (
                    x * math.cos(angle) - y * math.sin(angle),
                    x * math.sin(angle) + y * math.cos(angle),
                )
            pts.append((x, y))
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _render_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted gradient with clutter: lines, dots and blocks of low-saturation colours, plus noise."""
    base = rng.uniform(70, 190, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] if rng.random() < 0.5 else (
        np.linspace(0.0, 1.0, height)[:, None, None]
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
            x1, y1 = x0 + rng.uniform(-40, 40), y0 + rng.uniform(-40, 40)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            s = rng.uniform(1, 3)
            draw.ellipse([x0 - s, y0 - s, x0 + s, y0 + s], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + rng.uniform(3, 14), y0 + rng.uniform(3, 14)], fill=colour)
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


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
    img = _render_background(rng, layout["width"], layout["height"])
    masks = []
    for obj in layout["objects"]:
        name = TOY_CLASSES[obj["category"]]
        colour_name, shape = name.split("_")
        colour = tuple(
            int(v) for v in np.clip(np.array(COLOURS[colour_name]) + rng.uniform(-20, 20, size=3), 0, 255)
        )
        polygon = _shape_polygon(shape, *obj["center"], obj["radius"], obj["angle"])
        shape_mask = Image.new("L", img.size, 0)
        ImageDraw.Draw(shape_mask).polygon(polygon, fill=1)
        shape_mask = np.asarray(shape_mask, dtype=np.uint8)
        for m in masks:  # the new object hides what it covers of earlier ones
            m[shape_mask > 0] = 0
        masks.append(shape_mask.copy())
        ImageDraw.Draw(img).polygon(polygon, fill=colour)
    return img, masks


def _render_split(spec: ToyLVISSpec, split: str, out_dir: str, categories) -> Dict[str, Any]:
    images, annotations = [], []
    ann_id = _FIRST_IDS[split][1]
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for layout in toy_lvis_layout(spec, split):
        file_name = f"{split}/{layout['id']:012d}.png"
        img, masks = _render_image(spec, split, layout)
        img.save(os.path.join(out_dir, file_name))
        for obj, mask in zip(layout["objects"], masks):
            if not obj["annotated"]:
                continue
            polygons = _mask_polygons(mask)
            ys, xs = np.nonzero(mask)
            if not polygons or len(xs) == 0:
                raise RuntimeError(
                    f"Toy LVIS generator: an object of image {layout['id']} is hidden completely; "
                    f"lower ToyLVISSpec.max_box_occlusion (now {spec.max_box_occlusion})."
                )
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": layout["id"],
                    "category_id": obj["category"] + 1,
                    "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                    "area": int(mask.sum()),
                    "segmentation": polygons,
                }
            )
            ann_id += 1
        images.append(
            {
                "id": layout["id"],
                "file_name": file_name,
                "width": layout["width"],
                "height": layout["height"],
                "neg_category_ids": layout["neg_category_ids"],
                "not_exhaustive_category_ids": layout["not_exhaustive_category_ids"],
                "license": 1,
                "date_captured": "2024-01-01 00:00:00",
            }
        )
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


def _write_split(spec: ToyLVISSpec, split: str, out_dir: str, categories) -> None:
    """Render ``split`` into ``out_dir`` (``<split>/`` and ``annotations/lvis_v1_toy_<split>.json``)."""
    lvis_dict = _render_split(spec, split, out_dir, categories)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    with open(os.path.join(out_dir, "annotations", f"lvis_v1_toy_{split}.json"), "w") as f:
        json.dump(lvis_dict, f, sort_keys=True, separators=(",", ":"))


def generate_toy_lvis(root: str, spec: ToyLVISSpec = ToyLVISSpec()) -> Dict[str, str]:
    """
    Render the toy set into ``root/lvis_v1_toy/`` (``train/``, ``val/``, ``test/``,
    ``annotations/``) and return its paths (see :func:`toy_lvis_paths`). The same spec gives
    byte-identical files.

    The set is written to a temporary folder first and moved into place at the end, so that an
    interrupted run, or several processes generating at once, never leave a half-written set.
    An existing ``root/lvis_v1_toy`` is kept as it is (it is never overwritten).
    """
    paths = toy_lvis_paths(root)
    os.makedirs(root, exist_ok=True)
    categories = toy_lvis_categories(spec)
    staging = tempfile.mkdtemp(prefix=f".{DIRNAME}-", dir=root)
    try:
        for split in SPLITS:
            _write_split(spec, split, staging, categories)
        try:
            os.rename(staging, paths["image_root"])
        except OSError:
            if not all(os.path.isfile(paths[f"{split}_json"]) for split in SPLITS):
                raise
            # another process finished first: keep its (identical) set
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _add_split(root: str, spec: ToyLVISSpec, split: str) -> None:
    """
    Add a missing ``split`` to an existing toy set (one generated before the split existed): its
    images move into place first and its annotation file last, so the file marks a complete split.
    """
    paths = toy_lvis_paths(root)
    image_dir = os.path.join(paths["image_root"], split)
    if os.path.exists(image_dir):
        raise FileExistsError(
            f"'{image_dir}' exists but '{paths[f'{split}_json']}' does not: an interrupted or foreign "
            f"'{split}' split. It is not drcl2's to overwrite: move it away and the split will be "
            "generated again."
        )
    staging = tempfile.mkdtemp(prefix=f".{DIRNAME}-{split}-", dir=root)
    try:
        _write_split(spec, split, staging, toy_lvis_categories(spec))
        os.rename(os.path.join(staging, split), image_dir)
        os.makedirs(os.path.dirname(paths[f"{split}_json"]), exist_ok=True)
        os.rename(os.path.join(staging, "annotations", f"lvis_v1_toy_{split}.json"), paths[f"{split}_json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_toy_lvis(root: str, spec: ToyLVISSpec = ToyLVISSpec()) -> Dict[str, str]:
    """
    Generate the toy set under ``root`` unless it is already there; return its paths. A set made
    before the ``test`` split existed gets that split added (train and val stay untouched).
    """
    paths = toy_lvis_paths(root)
    missing = [split for split in SPLITS if not os.path.isfile(paths[f"{split}_json"])]
    if not missing:
        return paths
    if not os.path.exists(paths["image_root"]):
        return generate_toy_lvis(root, spec)
    if "train" in missing or "val" in missing:
        raise FileExistsError(
            f"'{paths['image_root']}' exists but holds no complete toy LVIS set (its annotation "
            "files are missing). It is not drcl2's to overwrite: move it away, or point "
            "$DETECTRON2_DATASETS elsewhere, and the set will be generated again."
        )
    for split in missing:
        _add_split(root, spec, split)
    return paths
