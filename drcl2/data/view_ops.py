"""
The augmentation ops of 2DRCL's views on uint8 images, with OpenCV / NumPy: the geometric ones
(:class:`RandomResizedCropAugmentation`, drawn by detectron2's augmentations on the image shape
alone, :func:`draw_geometric`, and rendered by :func:`render_geometric`) and the photometric ones
(:class:`ViewPhotometric`: colour jitter, grey, blur, solarization).

They render what detectron2's transforms (``apply_image``) and torchvision v2's photometric
transforms render, ~10x faster. Every op works on an ``ndarray[H, W, 3]`` uint8 image in ``"RGB"``
or ``"BGR"`` channel order (so the mapper never converts the decoded BGR image), returns uint8, and
does no float round trip of the whole image except the hue rotation (OpenCV's float32 HSV: the
uint8 HSV of OpenCV quantises hue to 1.4 degrees and saturation to 1/255, several grey levels off).
Against the reference op on the same image and parameter (``tests/data/test_view_ops.py``; the
reference, torchvision and detectron2, in ``tests/helpers/torchvision_reference.py``):

=============== ======================================== =======================================
op              how                                       largest difference to the reference
=============== ======================================== =======================================
crop            a view of the array                       0 (exact)
resize          cv2.resize bilinear when it enlarges      1 grey level (PIL's bilinear)
                both axes, else detectron2's (PIL)
flip            cv2.flip                                  0 (exact)
brightness      256-entry LUT, torchvision's formula      0 (exact)
contrast        LUT around the mean of the floored grey   1 grey level
saturation      one 3x3 colour matrix (cv2.transform)     1 grey level
hue             float32 HSV (cv2.cvtColor), truncation    1 grey level, on < 1% of the pixels
grey            cv2.transform, floor                      1 grey level (ties only)
Gaussian blur   separable (cv2.sepFilter2D)               1 grey level
                kernel cut where its tails < 1e-4
solarization    LUT                                       0 (exact)
=============== ======================================== =======================================

Random draws: :class:`ViewPhotometric` takes its parameters from torch's global generator in the
order torchvision's ``Compose`` of ``RandomApply(ColorJitter)``, ``RandomGrayscale``,
``RandomApply(GaussianBlur)`` and ``RandomSolarize`` takes them, so for the same torch seed both
pipelines pick the same ops and parameters, and their outputs differ only by the table above,
compounded along the chain (a whole view: at most 4 levels, on ~7% of the pixels; per-channel
means and stds of the views within 1 level; ``tests/data/test_view_ops.py``).

Each photometric op runs under a ``torch.profiler.record_function`` label (``view_ops/<op>``), so
a profiler splits a view's time per op (``python benchmarks/benchmark.py mapper``).
"""

import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from torch.profiler import record_function

__all__ = [
    "RandomResizedCropAugmentation",
    "ViewPhotometric",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "draw_geometric",
    "gaussian_blur",
    "gaussian_kernel1d",
    "grayscale",
    "render_geometric",
    "solarize",
]

# torchvision's grey weights (rgb_to_grayscale): 0.2989 R + 0.587 G + 0.114 B.
_GREY_RGB = np.array([0.2989, 0.587, 0.114], dtype=np.float64)
# Tail mass of the Gaussian kernel that may be cut (both sides together): at most 1e-4 * 255 =
# 0.026 grey levels before rounding.
_BLUR_TAIL = 1e-4


def _grey_weights(order: str) -> np.ndarray:
    if order == "RGB":
        return _GREY_RGB
    if order == "BGR":
        return _GREY_RGB[::-1].copy()
    raise ValueError(f"channel order must be 'RGB' or 'BGR', got {order!r}")


def _lut(values: np.ndarray) -> np.ndarray:
    """A uint8 LUT from float values: clamp to [0, 255], then truncate (torch's float -> uint8
    cast)."""
    return np.clip(values, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """``torchvision.transforms.v2.functional.adjust_brightness``: trunc(clamp(x * factor))."""
    x = np.arange(256, dtype=np.float32)
    return cv2.LUT(image, _lut(x * np.float32(factor)))


def _floor_grey_mean(image: np.ndarray, order: str) -> float:
    """Mean over the image of floor(0.2989 R + 0.587 G + 0.114 B) (torchvision's contrast mean)."""
    w = _grey_weights(order)
    # cv2.transform rounds to nearest; the -0.5 offset turns that into a floor (up to exact ties).
    grey = cv2.transform(image, np.array([[w[0], w[1], w[2], -0.5]], dtype=np.float32))
    return float(cv2.mean(grey)[0])


def adjust_contrast(image: np.ndarray, factor: float, order: str = "RGB") -> np.ndarray:
    """``adjust_contrast``: trunc(clamp(factor * x + (1 - factor) * mean(floor(grey(x)))))."""
    mean = np.float32(_floor_grey_mean(image, order))
    f = np.float32(factor)
    x = np.arange(256, dtype=np.float32)
    return cv2.LUT(image, _lut(x * f + mean * (np.float32(1.0) - f)))


def adjust_saturation(image: np.ndarray, factor: float, order: str = "RGB") -> np.ndarray:
    """
    ``adjust_saturation``: trunc(clamp(factor * x + (1 - factor) * floor(grey(x)))), as one colour
    matrix ``factor * I + (1 - factor) * 1 w^T`` (the grey is not floored inside: < 0.2 levels at
    the default factors, then the same truncation).
    """
    w = _grey_weights(order)
    m = (1.0 - factor) * np.tile(w, (3, 1)) + factor * np.eye(3)
    m = np.concatenate([m, np.full((3, 1), -0.5)], axis=1).astype(np.float32)
    return cv2.transform(image, m)


def grayscale(image: np.ndarray, order: str = "RGB") -> np.ndarray:
    """``rgb_to_grayscale(num_output_channels=3)``: floor(grey(x)) in all three channels."""
    w = _grey_weights(order)
    m = np.tile(np.array([w[0], w[1], w[2], -0.5]), (3, 1)).astype(np.float32)
    return cv2.transform(image, m)


def adjust_hue(image: np.ndarray, factor: float, order: str = "RGB") -> np.ndarray:
    """
    ``adjust_hue``: rotate the hue by ``factor`` turns in float32 HSV (OpenCV's conversions, which
    are scale-free in hue and saturation, so the image stays in [0, 255]), back to uint8 with
    torchvision's ``x / 255 * (255 + 1 - 1e-3)`` truncation.
    """
    if factor == 0:
        return image.copy()
    hsv = cv2.cvtColor(
        image.astype(np.float32), cv2.COLOR_RGB2HSV if order == "RGB" else cv2.COLOR_BGR2HSV
    )
    # Hue in degrees; OpenCV's HSV -> RGB wraps hues >= 360 itself.
    hsv = cv2.add(hsv, ((factor % 1.0) * 360.0, 0.0, 0.0, 0.0))
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB if order == "RGB" else cv2.COLOR_HSV2BGR)
    # round(x * a - 0.5) = floor(x * a) (up to exact ties); x >= 0, so the "Abs" does nothing.
    return cv2.convertScaleAbs(out, alpha=(255.0 + 1.0 - 1e-3) / 255.0, beta=-0.5)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel (``_get_gaussian_kernel1d``), in float64."""
    x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2.0
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """
    ``gaussian_blur(kernel_size, sigma)`` (reflect padding, rounding): separable, in fixed point,
    with the kernel cut to the smallest odd size whose cut tails hold < 1e-4 of its mass (a 23-tap
    kernel at sigma 0.5 needs 5 taps; a kernel of 1 tap returns a copy).
    """
    k = gaussian_kernel1d(kernel_size, sigma)
    c = kernel_size // 2
    radius = c
    # tails[r] = mass outside [c - r, c + r]
    for r in range(c + 1):
        if 1.0 - k[c - r : c + r + 1].sum() < _BLUR_TAIL:
            radius = r
            break
    if radius == 0:
        return image.copy()
    k = k[c - radius : c + radius + 1]
    k = (k / k.sum()).reshape(-1, 1)
    h, w = image.shape[:2]
    if radius >= min(h, w):  # reflect-101 padding needs the image wider than the radius
        image = cv2.copyMakeBorder(image, radius, radius, radius, radius, cv2.BORDER_REFLECT_101)
        out = cv2.sepFilter2D(image, -1, k, k, borderType=cv2.BORDER_REFLECT_101)
        return out[radius : radius + h, radius : radius + w].copy()
    return cv2.sepFilter2D(image, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """``solarize``: 255 - x where x >= threshold."""
    x = np.arange(256)
    return cv2.LUT(image, np.where(x >= threshold, 255 - x, x).astype(np.uint8))


def _jitter_range(
    value: float, center: float, clip_first_on_zero: bool
) -> Optional[Tuple[float, float]]:
    """torchvision ColorJitter._check_input for a single number; None when the op is a no-op."""
    lo, hi = center - value, center + value
    if clip_first_on_zero:
        lo = max(lo, 0.0)
    return None if lo == hi == center else (float(lo), float(hi))


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi).item())


class ViewPhotometric:
    """
    MoCo/BYOL photometric augmentation of one view on a uint8 ``ndarray[H, W, 3]`` in
    ``channel_order``: colour jitter (prob; brightness, contrast, saturation, hue in a random
    order), grey (prob), Gaussian blur (prob), solarization (prob). Arguments, probabilities,
    parameter ranges and torch random draws are those of torchvision v2's ``Compose`` of
    ``RandomApply(ColorJitter)``, ``RandomGrayscale``, ``RandomApply(GaussianBlur)`` and
    ``RandomSolarize``; the ops are this module's.
    """

    def __init__(
        self,
        *,
        color_jitter_prob: float,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        grayscale_prob: float,
        blur_prob: float,
        blur_kernel_size: int,
        blur_sigma: Tuple[float, float],
        solarize_prob: float,
        solarize_threshold: int = 128,
        channel_order: str = "RGB",
    ):
        _grey_weights(channel_order)  # validates
        self.channel_order = channel_order
        self.color_jitter_prob = color_jitter_prob
        self.ranges = (
            _jitter_range(brightness, 1.0, True),
            _jitter_range(contrast, 1.0, True),
            _jitter_range(saturation, 1.0, True),
            _jitter_range(hue, 0.0, False),
        )
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.blur_kernel_size = int(blur_kernel_size)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.solarize_prob = solarize_prob
        self.solarize_threshold = solarize_threshold

    def __repr__(self):
        return (
            f"ViewPhotometric(color_jitter_prob={self.color_jitter_prob}, "
            f"ranges={self.ranges}, grayscale_prob={self.grayscale_prob}, "
            f"blur_prob={self.blur_prob}, blur_kernel_size={self.blur_kernel_size}, "
            f"blur_sigma={self.blur_sigma}, solarize_prob={self.solarize_prob}, "
            f"channel_order={self.channel_order!r})"
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """
        Args:
            image: ndarray[H, W, 3] uint8 in ``channel_order`` (not modified).

        Returns:
            ndarray[H, W, 3] uint8: the augmented image (``image`` itself when no op ran).
        """
        order = self.channel_order
        # The draws below mirror torchvision v2: RandomApply / _RandomApplyTransform draw
        # torch.rand(1) and skip when it is >= p; ColorJitter draws randperm(4), then one uniform
        # per op that is not a no-op; GaussianBlur draws sigma.
        if _drawn(self.color_jitter_prob):
            fn_idx = torch.randperm(4).tolist()
            factors = [None if r is None else _uniform(*r) for r in self.ranges]
            jitter = (
                ("brightness", adjust_brightness, ()),
                ("contrast", adjust_contrast, (order,)),
                ("saturation", adjust_saturation, (order,)),
                ("hue", adjust_hue, (order,)),
            )
            for fn_id in fn_idx:
                if factors[fn_id] is not None:
                    name, op, extra = jitter[fn_id]
                    image = _labelled(name, op, image, factors[fn_id], *extra)
        if _drawn(self.grayscale_prob):
            image = _labelled("grey", grayscale, image, order)
        if _drawn(self.blur_prob):
            sigma = _uniform(*self.blur_sigma)
            image = _labelled("blur", gaussian_blur, image, self.blur_kernel_size, sigma)
        if _drawn(self.solarize_prob):
            image = _labelled("solarize", solarize, image, self.solarize_threshold)
        return image


def _drawn(prob: float) -> bool:
    """torchvision's RandomApply draw: one ``torch.rand(1)`` (none when ``prob`` is 0)."""
    return prob > 0 and not torch.rand(1) >= prob


def _labelled(name: str, op, *args) -> np.ndarray:
    """``op(*args)`` under the profiler label ``view_ops/<name>``."""
    with record_function(f"view_ops/{name}"):
        return op(*args)


# ---------------------------------------------------------------------------------------------
# Geometric augmentation: drawn on the image shape, rendered with OpenCV.


class RandomResizedCropAugmentation(T.Augmentation):
    """
    The crop of torchvision's ``RandomResizedCrop`` as a detectron2 augmentation: a window covering
    a random fraction ``scale`` of the image area with aspect ratio (w / h) log-uniform in
    ``ratio``; the resize is left to a following :class:`ResizeShortestEdge`. After 10 failed draws
    it falls back to the largest centred window with an aspect ratio inside ``ratio``.
    """

    def __init__(
        self, scale: Tuple[float, float] = (0.3, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    ):
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(
                f"RandomResizedCropAugmentation: scale must satisfy 0 < lo <= hi <= 1, got {scale}"
            )
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"RandomResizedCropAugmentation: ratio must satisfy 0 < lo <= hi, got {ratio}"
            )
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = np.random.randint(0, w - cw + 1)
                y0 = np.random.randint(0, h - ch + 1)
                return T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return T.CropTransform((w - cw) // 2, (h - ch) // 2, cw, ch, orig_w=w, orig_h=h)


class _ShapeInput:
    """
    Stands in for detectron2's ``AugInput`` when only the transforms are wanted: it carries the
    image *shape* through the augmentations' ``get_transform`` (as a zero-stride array, so nothing
    is allocated or resampled).
    """

    def __init__(self, shape: Sequence[int]):
        self.image = _shape_only(shape)

    def transform(self, tfm: T.Transform) -> None:
        h, w = self.image.shape[:2]
        if isinstance(tfm, T.CropTransform):
            h, w = tfm.h, tfm.w
        elif isinstance(tfm, T.ResizeTransform):
            h, w = tfm.new_h, tfm.new_w
        elif not isinstance(tfm, (T.HFlipTransform, T.VFlipTransform, T.NoOpTransform)):
            h, w = tfm.apply_image(np.zeros(self.image.shape, np.uint8)).shape[:2]
        self.image = _shape_only((h, w) + self.image.shape[2:])


def _shape_only(shape: Sequence[int]) -> np.ndarray:
    return np.broadcast_to(np.zeros((1,) * len(shape), np.uint8), tuple(shape))


def draw_geometric(augmentations: T.AugmentationList, shape: Sequence[int]) -> T.TransformList:
    """
    The transforms ``augmentations`` draw for an image of ``shape`` (H, W, C), without its pixels:
    the same draws, from the same random streams, as ``augmentations(AugInput(image))``.
    """
    return augmentations(_ShapeInput(shape))


def render_geometric(image: np.ndarray, transforms: T.TransformList) -> np.ndarray:
    """
    ``transforms.apply_image(image)`` for a crop / resize / flip chain, with OpenCV: the crop is a
    view, a bilinear resize that enlarges both axes is ``cv2.resize`` (PIL's bilinear upscaling to
    1 grey level), a flip is ``cv2.flip``. Any other transform, and a resize that shrinks an axis
    (where PIL's bilinear filter antialiases and OpenCV's does not), uses the transform's own
    ``apply_image``.

    Args:
        image: ndarray[H, W, C] (uint8 for OpenCV's paths).
        transforms: the view's transforms (e.g. from :func:`draw_geometric`).

    Returns:
        ndarray[H_v, W_v, C], C-contiguous.
    """
    out = image
    for t in transforms.transforms:
        if isinstance(t, T.CropTransform):
            out = out[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w]
        elif isinstance(t, T.NoOpTransform):
            continue
        elif (
            isinstance(t, T.ResizeTransform)
            and out.dtype == np.uint8
            and out.ndim == 3
            and t.interp == T.Resize((1, 1)).interp  # bilinear
            and t.new_h >= t.h
            and t.new_w >= t.w
        ):
            out = cv2.resize(out, (t.new_w, t.new_h), interpolation=cv2.INTER_LINEAR)
        elif isinstance(t, (T.HFlipTransform, T.VFlipTransform)) and out.ndim == 3:
            out = cv2.flip(np.ascontiguousarray(out), 1 if isinstance(t, T.HFlipTransform) else 0)
        else:
            out = t.apply_image(np.ascontiguousarray(out))
    return np.ascontiguousarray(out)
