"""
The class vocabulary of the generated LVIS-format sets (:mod:`drcl2.data.generated.toy_lvis`): what
each class looks like, and how an instance of it is drawn.

A class is a (colour, shape, pattern) triple. The first 30 are the toy set's: its ten shapes in its
three colours, solid, in the order the toy set has always had (their names, ``red_circle`` ...,
are unchanged). Beyond them come 6 more shapes, 5 more colours and 3 patterns (``striped``,
``outlined``, ``twotone``), 512 classes in all, in one fixed shuffled order, so that the first K of
the vocabulary mix shapes, colours and patterns for any K. The choices keep classes apart:

* shapes differ in outline under any rotation (corner count, concavity, aspect), and every outline
  lies inside the unit disc, so an object of radius r fits the r-box the layout places it in;
* colours are saturated (more than the background and its clutter) and at least ~75 apart in RGB;
* patterns change the inside of the shape, not its silhouette, so masks and boxes stay those of the
  shape: light stripes across it, a light inside within a border of the colour, or one half in a
  dark shade of the colour.
"""

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "ToyClass",
    "toy_classes",
    "shape_polygon",
    "paint_pattern",
    "MAX_TOY_CLASSES",
    "COLOURS",
]

# The toy set's ten shapes first (their order fixes the toy set), then the extension.
SHAPES = (
    "circle", "square", "triangle", "diamond", "pentagon",
    "hexagon", "star", "cross", "arrow", "ellipse",
    "semicircle", "crescent", "heart", "bar", "trapezoid", "chevron",
)  # fmt: skip
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 45, 40), "green": (40, 170, 60), "blue": (45, 80, 215),  # the toy set's
    "yellow": (230, 205, 30), "purple": (130, 50, 190), "cyan": (30, 190, 200),
    "orange": (240, 130, 25), "magenta": (225, 60, 190),
}  # fmt: skip
PATTERNS = ("solid", "striped", "outlined", "twotone")
_TOY_SHAPES, _TOY_COLOURS = SHAPES[:10], tuple(COLOURS)[:3]


@dataclass(frozen=True)
class ToyClass:
    """One generated class: a shape, filled with a colour in a pattern."""

    colour: str
    shape: str
    pattern: str = "solid"

    @property
    def name(self) -> str:
        """``<colour>_<shape>`` for solid classes (the toy set's names), else ``..._<pattern>``."""
        base = f"{self.colour}_{self.shape}"
        return base if self.pattern == "solid" else f"{base}_{self.pattern}"

    @property
    def definition(self) -> str:
        """The LVIS ``def`` field."""
        pattern = "" if self.pattern == "solid" else f"{self.pattern} "
        return f"a {pattern}{self.colour} {self.shape} (generated toy class)"


def _vocabulary() -> Tuple[ToyClass, ...]:
    toy = [ToyClass(colour, shape) for shape in _TOY_SHAPES for colour in _TOY_COLOURS]
    rest = [
        ToyClass(colour, shape, pattern)
        for pattern in PATTERNS
        for shape in SHAPES
        for colour in COLOURS
        if ToyClass(colour, shape, pattern) not in toy
    ]
    # a fixed order (not the dataset seed's): class i is the same class in every generated set
    random.Random("drcl2-toy-class-vocabulary").shuffle(rest)
    return tuple(toy + rest)


_VOCABULARY = _vocabulary()
MAX_TOY_CLASSES = len(_VOCABULARY)


def toy_classes(num_classes: int, first: int = 0) -> Tuple[ToyClass, ...]:
    """
    ``num_classes`` classes of the vocabulary from class ``first`` on: the first 30 are the toy
    set's; a set from ``first`` >= 30 on has none of them (the source set, the stand-in for
    ImageNet).
    """
    if not 0 <= first or not 1 <= num_classes <= MAX_TOY_CLASSES - first:
        raise ValueError(
            f"toy_classes: classes {first}..{first + num_classes - 1} are not all in the "
            f"vocabulary of {MAX_TOY_CLASSES} classes (first >= 0, num_classes >= 1)."
        )
    return _VOCABULARY[first : first + num_classes]


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------
def _normalised(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Centre an outline on its box and scale it to touch the unit circle."""
    pts = np.asarray(points, dtype=np.float64)
    pts -= (pts.min(0) + pts.max(0)) / 2
    pts /= np.linalg.norm(pts, axis=1).max()
    return [(float(x), float(y)) for x, y in pts]


def _crescent() -> List[Tuple[float, float]]:
    # the unit disc minus a disc of radius 0.8 centred at (0.45, 0): outer arc, then inner arc back
    d, rho = 0.45, 0.8
    x = (1 + d * d - rho * rho) / (2 * d)
    outer_from = math.atan2(math.sqrt(1 - x * x), x)
    inner_from = math.atan2(math.sqrt(1 - x * x), x - d)
    outer = [
        (math.cos(a), math.sin(a)) for a in np.linspace(outer_from, 2 * math.pi - outer_from, 20)
    ]
    inner_angles = np.linspace(2 * math.pi - inner_from, inner_from, 16)
    inner = [(d + rho * math.cos(a), rho * math.sin(a)) for a in inner_angles]
    return outer + inner


def _heart() -> List[Tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(
        13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    )  # image y points down
    return list(zip(x, y))


# Shapes given as outlines in the object's own frame (rotated by its angle when drawn).
_LOCAL_OUTLINES = {
    "arrow": [
        (1.0, 0.0),
        (0.1, 0.8),
        (0.1, 0.35),
        (-1.0, 0.35),
        (-1.0, -0.35),
        (0.1, -0.35),
        (0.1, -0.8),
    ],
    "semicircle": _normalised([(math.cos(a), math.sin(a)) for a in np.linspace(0, math.pi, 17)]),
    "crescent": _normalised(_crescent()),
    "heart": _normalised(_heart()),
    "bar": _normalised([(-1.0, -0.42), (1.0, -0.42), (1.0, 0.42), (-1.0, 0.42)]),
    "trapezoid": _normalised([(-1.0, 0.55), (1.0, 0.55), (0.45, -0.55), (-0.45, -0.55)]),
    "chevron": _normalised(
        [(-0.8, -0.85), (0.0, -0.85), (0.8, 0.0), (0.0, 0.85), (-0.8, 0.85), (0.0, 0.0)]
    ),
}


def shape_polygon(
    shape: str, cx: float, cy: float, r: float, angle: float
) -> List[Tuple[float, float]]:
    """The outline of ``shape`` with radius ``r`` (it lies within the r-disc) centred at (cx, cy),
    rotated
    by ``angle`` (radians), as image points (x, y)."""
    if shape in _LOCAL_OUTLINES:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in _LOCAL_OUTLINES[shape]]
        return [(cx + r * x, cy + r * y) for x, y in pts]
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
        }[shape]
    if shape == "cross":
        # a plus sign: 12 corners on two radii
        pts = []
        for k in range(4):
            a = angle + k * math.pi / 2
            for da, rr in ((-0.4, 1.0), (0.4, 1.0), (math.pi / 4, 0.42)):
                pts.append((rr * math.cos(a + da), rr * math.sin(a + da)))
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


# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------
def paint_pattern(
    img: Image.Image,
    pattern: str,
    shape_mask: np.ndarray,
    colour: Tuple[int, int, int],
    center: Tuple[float, float],
    radius: float,
    angle: float,
    rng: np.random.Generator,
) -> None:
    """
    Paint ``pattern`` over a shape already filled with ``colour`` in ``img`` (in place). Only pixels
    of ``shape_mask`` (uint8[H, W], 1 inside the shape) change, so the silhouette stays the shape's.
    Solid classes draw nothing and take nothing from ``rng``.
    """
    if pattern == "solid":
        return
    # the shape lies within its r-box: work on that crop of the image only
    height, width = shape_mask.shape
    x0, y0 = max(0, math.floor(center[0] - radius) - 1), max(0, math.floor(center[1] - radius) - 1)
    x1, y1 = (
        min(width, math.ceil(center[0] + radius) + 2),
        min(height, math.ceil(center[1] + radius) + 2),
    )
    inside = shape_mask[y0:y1, x0:x1] > 0
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5  # pixel centres
    u = (xx - center[0]) * math.cos(angle) + (yy - center[1]) * math.sin(angle)  # along the object
    v = -(xx - center[0]) * math.sin(angle) + (yy - center[1]) * math.cos(angle)  # across it
    if pattern == "striped":
        period = max(3.0, radius / 2.5)
        paint = inside & (np.floor(u / period) % 2 == 1)
        fill = _light(rng)
    elif pattern == "outlined":
        border = max(2, round(0.2 * radius))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * border + 1, 2 * border + 1))
        paint = cv2.erode(inside.astype(np.uint8), kernel, borderValue=0) > 0
        fill = _light(rng)
    elif pattern == "twotone":
        paint = inside & (v > 0)
        fill = tuple(int(c * 0.45) for c in colour)
    else:
        raise ValueError(f"Unknown pattern '{pattern}'; expected one of {PATTERNS}.")
    img.paste(fill, (x0, y0, x1, y1), Image.fromarray(paint.astype(np.uint8) * 255))


def _light(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(235 + rng.uniform(-10, 10, size=3), 0, 255))
