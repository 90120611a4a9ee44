"""
The random draws of one 2DRCL pre-training step (docs/method.md, "Masking" and "DRB"): which K
instances of each image LCL and box-guided masking take, and which patches of view 1 are masked.
Each image draws from its own generator, seeded by ``(seed, iteration, image key)``
(:func:`drcl2.utils.seeding.derived_seed`), so the draws
do not depend on how a batch is split over processes, and a resumed run repeats them.
"""

import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Instances
from detectron2.utils import comm

from ..data.rebalance import instance_class_weights, sample_instances
from ..utils.seeding import DRAW_STREAM, derived_seed
from .masking import box_guided_patch_mask, patch_mask_to_pixels

__all__ = ["draw_step", "image_key", "lcl_boxes", "model_draws"]


def image_key(x: Dict, index: int, num_images: int) -> int:
    """
    The integer that seeds an image's draws: its dataset ``image_id`` (strings hashed with CRC32,
    stable across processes); without one, its position in the global batch assuming every rank
    holds ``num_images`` images (as detectron2's loaders give).
    """
    image_id = x.get("image_id")
    if isinstance(image_id, int):
        return image_id
    if image_id is not None:
        return zlib.crc32(str(image_id).encode())
    return comm.get_rank() * num_images + index


def draw_step(
    batched_inputs: Sequence[Dict],
    boxes: Sequence[Instances],
    image_sizes: Sequence[Tuple[int, int]],
    padded_size: Tuple[int, int],
    *,
    seed: int,
    iteration: int,
    num_instances: int,
    needs_instances: bool,
    instance_weights: torch.Tensor,
    mask_weights: torch.Tensor,
    patch_size: int,
    mask_ratio: float,
    box_guided: float,
) -> Tuple[List[Optional[torch.Tensor]], Optional[torch.Tensor]]:
    """
    The draws of one step: K instances of each image (probability proportional to
    ``instance_weights`` of their classes), then its masked patches of view 1, placed in the drawn
    boxes with probability proportional to ``mask_weights`` of their classes.

    Args:
        batched_inputs: the N input dicts (their ``image_id`` seeds the draws).
        boxes: N Instances(gt_boxes, gt_classes) of view 1 to draw from (class -1: unlabelled).
        image_sizes: N (h, w) of view 1 without padding.
        padded_size: (H, W) of the padded batch.
        seed, iteration: the model's seed and the training iteration.
        num_instances: K; needs_instances: a head uses the drawn instances (else they are drawn
            only for box-guided masking).
        instance_weights, mask_weights: Tensor[C], w_c(lambda) (or 1 where DRB.APPLY_TO leaves the
            term out).
        patch_size, mask_ratio, box_guided: the masking (``mask_ratio`` 0: nothing is masked).

    Returns:
        list of N LongTensor[K_i] (indices into the image's boxes; the same rows in both views) or
        N None; BoolTensor[N, H, W] (True = masked pixel of view 1) or None, both on the CPU.
    """
    masking = mask_ratio > 0
    need_sampled = needs_instances or (masking and box_guided > 0)
    if not (need_sampled or masking):
        return [None] * len(batched_inputs), None
    instance_weights, mask_weights = instance_weights.cpu(), mask_weights.cpu()
    sampled, masks, occurrences = [], [], {}
    for i, (x, inst, size) in enumerate(zip(batched_inputs, boxes, image_sizes)):
        key = image_key(x, i, len(batched_inputs))
        occurrences[key] = occurrences.get(key, -1) + 1  # an image repeated in the batch
        seed_i = derived_seed(seed, DRAW_STREAM, iteration, key, occurrences[key])
        generator = torch.Generator().manual_seed(seed_i)
        classes = inst.gt_classes.cpu()
        idx = None
        if need_sampled:
            idx = sample_instances(classes, instance_weights, num_instances, generator)
        if masking:
            if idx is not None and len(idx):
                box_tensor = inst.gt_boxes.tensor.cpu()[idx]
                box_weights = instance_class_weights(classes[idx], mask_weights)
            else:
                box_tensor, box_weights = torch.zeros(0, 4), torch.zeros(0)
            patches = box_guided_patch_mask(
                tuple(size), patch_size, mask_ratio, box_tensor, box_weights, box_guided,
                generator=generator,
            )  # fmt: skip
            masks.append(patch_mask_to_pixels(patches, patch_size, padded_size))
        sampled.append(idx)
    return sampled, (torch.stack(masks) if masks else None)


def lcl_boxes(batched_inputs: Sequence[Dict], box_source: str, device) -> Tuple[list, list]:
    """
    The boxes LCL and box-guided masking draw from: N ``Instances(gt_boxes, gt_classes)`` of view 1
    and of view 2 (rows aligned; class -1: an unlabelled proposal), the views' annotated
    ``instances`` (``box_source`` "gt") or their ``proposals`` ("proposals").
    """
    if box_source == "gt":
        return tuple(
            [x[v]["instances"].to(device) for x in batched_inputs] for v in ("view1", "view2")
        )
    views = []
    for v in ("view1", "view2"):
        out = []
        for i, x in enumerate(batched_inputs):
            if "proposals" not in x[v]:
                raise ValueError(
                    f"DRCL2: MODEL.DRCL2.LCL.BOX_SOURCE is 'proposals' but input {i} (image "
                    f"{x.get('image_id')!r}) has no {v} 'proposals'. Build the data with "
                    "TwoViewDatasetMapper from the same config (it carries the proposals of "
                    "DATASETS.PROPOSAL_FILES_TRAIN when MODEL.LOAD_PROPOSALS is True)."
                )
            p = x[v]["proposals"].to(device)
            out.append(Instances(p.image_size, gt_boxes=p.proposal_boxes, gt_classes=p.gt_classes))
        views.append(out)
    if any(len(a) != len(b) for a, b in zip(*views)):
        raise ValueError("DRCL2: the two views of an image must hold the same proposals.")
    return views[0], views[1]


@torch.no_grad()
def model_draws(model, batched_inputs: Sequence[Dict], iteration: int):
    """
    The draws a :class:`DRCL2` ``model``'s training step at ``iteration`` makes for
    ``batched_inputs`` (no network runs, no global random state is used), to look at what a step
    trains on (``python -m drcl2.tools.visualize views``, ``VIS_PERIOD``).

    Returns:
        N LongTensor[K_i] (drawn rows of the LCL boxes) or N None; N BoolTensor[h_i, w_i] (True: a
        masked pixel of view 1, (h_i, w_i) its size) or None when nothing is masked.
    """
    sizes = [tuple(x["view1"]["image"].shape[-2:]) for x in batched_inputs]
    padded = (max(h for h, _ in sizes), max(w for _, w in sizes))
    boxes = lcl_boxes(batched_inputs, model.box_source, model.device)[0]
    weights = model.term_weights_at(iteration)[1]
    sampled, pixel_mask = model._draw(batched_inputs, boxes, sizes, padded, iteration, weights)
    if pixel_mask is None:
        return sampled, None
    return sampled, [m[:h, :w].cpu() for m, (h, w) in zip(pixel_mask, sizes)]
