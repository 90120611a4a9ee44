"""
Box-guided patch masking for dual reconstruction (docs/method.md, "Masking"): pure functions of
tensors.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["box_guided_patch_mask", "patch_mask_to_pixels", "mask_at_stride"]


def box_guided_patch_mask(
    image_size: Tuple[int, int],
    patch_size: int,
    mask_ratio: float,
    boxes: torch.Tensor,
    box_weights: torch.Tensor,
    box_guided_fraction: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """
    Choose the patches to mask in one image.

    The image (its unpadded size) is cut into ``patch_size`` patches (the last row / column may be
    partial); ``round(mask_ratio * num_patches)`` are masked. Of those, ``round(box_guided_fraction
    * num_masked)`` are drawn without replacement from the patches whose centre lies inside one of
    ``boxes``, each with probability proportional to the largest weight of the boxes holding it (so
    rare-class objects are masked more often); the rest are drawn uniformly from the remaining
    patches. If the boxes hold fewer patches than asked for, all of them are masked and the rest is
    drawn uniformly.

    Args:
        image_size: (h, w) of the image without padding.
        patch_size: side of a square patch, in pixels.
        mask_ratio: fraction of patches to mask, in [0, 1).
        boxes: Tensor[R, 4] (x0, y0, x1, y1) in image pixels; R may be 0.
        box_weights: Tensor[R], >= 0, one weight per box (e.g. w_c(lambda) of its class).
        box_guided_fraction: fraction of the masked patches taken inside boxes, in [0, 1].
        generator: random generator (default: torch's global one).

    Returns:
        BoolTensor[ceil(h / patch_size), ceil(w / patch_size)] on the CPU, True = masked.
    """
    h, w = image_size
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    num_patches = gh * gw
    num_masked = int(round(mask_ratio * num_patches))
    chosen = torch.zeros(num_patches, dtype=torch.bool)
    if num_masked == 0:
        return chosen.view(gh, gw)

    num_in_boxes = int(round(box_guided_fraction * num_masked))
    if num_in_boxes > 0 and boxes.numel() > 0:
        boxes = boxes.detach().float().cpu()
        box_weights = box_weights.detach().float().cpu()
        ys = (torch.arange(gh, dtype=torch.float32) + 0.5) * patch_size
        xs = (torch.arange(gw, dtype=torch.float32) + 0.5) * patch_size
        cy = ys.clamp(max=h)[:, None].expand(gh, gw).reshape(-1)
        cx = xs.clamp(max=w)[None, :].expand(gh, gw).reshape(-1)
        inside = (
            (cx[:, None] >= boxes[None, :, 0])
            & (cx[:, None] <= boxes[None, :, 2])
            & (cy[:, None] >= boxes[None, :, 1])
            & (cy[:, None] <= boxes[None, :, 3])
        )  # [P, R]
        patch_weight = (inside.float() * box_weights[None, :]).amax(dim=1)  # [P]
        candidates = int((patch_weight > 0).sum())
        take = min(num_in_boxes, candidates)
        if take > 0:
            idx = torch.multinomial(patch_weight, take, replacement=False, generator=generator)
            chosen[idx] = True

    remaining = num_masked - int(chosen.sum())
    if remaining > 0:
        free = (~chosen).nonzero().squeeze(1)
        perm = torch.randperm(free.numel(), generator=generator)[:remaining]
        chosen[free[perm]] = True
    return chosen.view(gh, gw)


def patch_mask_to_pixels(patch_mask: torch.Tensor, patch_size: int, padded_size: Tuple[int, int]):
    """
    Args:
        patch_mask: BoolTensor[gh, gw] from :func:`box_guided_patch_mask`.
        patch_size: side of a patch.
        padded_size: (H, W) of the padded batch tensor (>= the image size).

    Returns:
        BoolTensor[H, W]: True on masked pixels; padding beyond the patch grid is False.
    """
    H, W = padded_size
    pixels = patch_mask.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    out = torch.zeros(H, W, dtype=torch.bool, device=patch_mask.device)
    ph, pw = min(H, pixels.shape[0]), min(W, pixels.shape[1])
    out[:ph, :pw] = pixels[:ph, :pw]
    return out


def mask_at_stride(pixel_mask: torch.Tensor, stride: int, size: Tuple[int, int]) -> torch.Tensor:
    """
    A feature location is masked when any pixel of its ``stride x stride`` cell is masked.

    Args:
        pixel_mask: BoolTensor[N, H, W].
        stride: the feature level's stride.
        size: (h, w) of the feature map.

    Returns:
        BoolTensor[N, h, w].
    """
    pooled = F.max_pool2d(
        pixel_mask[:, None].float(), kernel_size=stride, stride=stride, ceil_mode=True
    )
    pooled = pooled[:, 0, : size[0], : size[1]]
    if pooled.shape[-2:] != tuple(size):
        pooled = F.pad(pooled, (0, size[1] - pooled.shape[-1], 0, size[0] - pooled.shape[-2]))
    return pooled > 0
