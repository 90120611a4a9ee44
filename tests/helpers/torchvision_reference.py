"""
The test oracle of drcl2's view rendering (drcl2/data/view_ops.py): the same augmentations, drawn
from the same random streams, rendered by detectron2's transforms (``apply_image``, PIL) and
torchvision v2's photometric transforms on a uint8 RGB tensor, about 10x slower.
tests/data/test_view_ops.py checks each OpenCV op, and whole views of the mapper, against these.
"""

from typing import Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from torchvision.transforms import v2 as TV

from drcl2.data.two_view_mapper import TwoViewDatasetMapper

__all__ = [
    "TorchvisionPhotometric",
    "TorchvisionReferenceMapper",
    "build_view_photometric",
    "render_reference",
    "torchvision_op",
]


def build_view_photometric(
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
):
    """
    MoCo/BYOL photometric augmentation of one view, from torchvision's v2 transforms, applied to a
    uint8 RGB ``Tensor[3, H, W]``: colour jitter (prob), grey (prob), Gaussian blur (prob),
    solarization (prob). None when no op can run.
    """
    ops = []
    if color_jitter_prob > 0:
        ops.append(
            TV.RandomApply(
                [TV.ColorJitter(brightness, contrast, saturation, hue)], p=color_jitter_prob
            )
        )
    if grayscale_prob > 0:
        ops.append(TV.RandomGrayscale(p=grayscale_prob))
    if blur_prob > 0:
        ops.append(
            TV.RandomApply([TV.GaussianBlur(blur_kernel_size, sigma=blur_sigma)], p=blur_prob)
        )
    if solarize_prob > 0:
        ops.append(TV.RandomSolarize(threshold=solarize_threshold, p=solarize_prob))
    return TV.Compose(ops) if ops else None


def torchvision_op(op, rgb: np.ndarray, *args) -> np.ndarray:
    """``op(Tensor[3, H, W], *args)`` of torchvision on an ``ndarray[H, W, 3]`` RGB image."""
    t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    return op(t, *args).permute(1, 2, 0).numpy()


class TorchvisionPhotometric:
    """
    :func:`build_view_photometric` as the mapper's photometric augmentation: on a uint8
    ``ndarray[H, W, 3]`` in ``channel_order`` ("RGB" or "BGR"), as
    :class:`~drcl2.data.view_ops.ViewPhotometric` is.
    """

    def __init__(self, channel_order: str = "RGB", **kwargs):
        assert channel_order in ("RGB", "BGR"), channel_order
        self.channel_order = channel_order
        self.ops = build_view_photometric(**kwargs)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.ops is None:
            return image
        rgb = image if self.channel_order == "RGB" else image[:, :, ::-1]
        out = torchvision_op(self.ops, np.asarray(rgb, dtype=np.uint8))
        return out if self.channel_order == "RGB" else out[:, :, ::-1]


def render_reference(image: np.ndarray, transforms: T.TransformList) -> np.ndarray:
    """What :func:`~drcl2.data.view_ops.render_geometric` renders, by detectron2's transforms."""
    return transforms.apply_image(image)


class TorchvisionReferenceMapper(TwoViewDatasetMapper):
    """
    The two-view mapper rendered by the reference: each view's geometric transforms by
    :func:`render_reference`, its photometric augmentation by :class:`TorchvisionPhotometric` of
    the same INPUT.DRCL2 keys. The augmentations drawn, the boxes and the random streams are the
    mapper's own.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        args = super().from_config(cfg, is_train)
        d = cfg.INPUT.DRCL2

        def photometric(view):
            return TorchvisionPhotometric(
                channel_order=cfg.INPUT.FORMAT,
                color_jitter_prob=d.COLOR_JITTER_PROB,
                brightness=d.BRIGHTNESS,
                contrast=d.CONTRAST,
                saturation=d.SATURATION,
                hue=d.HUE,
                grayscale_prob=d.GRAYSCALE_PROB,
                blur_prob=d.BLUR_PROB[view],
                blur_kernel_size=d.BLUR_KERNEL_SIZE,
                blur_sigma=tuple(d.BLUR_SIGMA),
                solarize_prob=d.SOLARIZE_PROB[view],
            )

        args["photometric1"] = photometric(0) if d.VIEW1_PHOTOMETRIC else None
        args["photometric2"] = photometric(1)
        return args

    def make_view(self, image, boxes, view, transforms=None):
        _, view_boxes, visible, transforms = super().make_view(image, boxes, view, transforms)
        return render_reference(image, transforms), view_boxes, visible, transforms
