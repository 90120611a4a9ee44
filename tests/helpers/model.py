"""A tiny DRCL2 (R-18, the toy pre-training config) and synthetic two-view batches, for the model
tests (CPU, or the device of DRCL2_TEST_DEVICE)."""

import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from drcl2.config import add_drcl2_config
from drcl2.data.rebalance import build_rebalance_schedule

from . import REPO_ROOT, TEST_DEVICE

LOSS_KEYS = {
    "loss_hcl",
    "loss_lcl_inst",
    "loss_lcl_sup",
    "loss_ar",
    "loss_sr",
    "loss_rpn_cls",
    "loss_rpn_loc",
}


def tiny_cfg(*opts):
    """The toy 2DRCL config, tiny; the supervised detection head off (its tests switch it on)."""
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            TEST_DEVICE,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            5,
            "MODEL.DRCL2.DET.ENABLED",
            False,
            "MODEL.MASK_ON",
            False,
            "MODEL.ROI_BOX_HEAD.FC_DIM",
            64,
            "MODEL.DRCL2.MLP_HIDDEN_DIM",
            32,
            "MODEL.DRCL2.MLP_OUT_DIM",
            16,
            "MODEL.DRCL2.AR.HIDDEN_DIM",
            16,
            "MODEL.DRCL2.SR.HIDDEN_DIM",
            16,
            "SOLVER.MAX_ITER",
            10,
            "DATALOADER.DRCL2.CHUNK_ITERS",  # lambda taken at every iteration of the short schedule
            1,
            *opts,
        ]
    )
    return cfg


def view(seed, size, boxes, classes):
    """A uint8 image of smooth random blobs plus noise (images differ in their global statistics,
    unlike pure noise), and its instances."""
    g = torch.Generator().manual_seed(seed)
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_ids = torch.arange(len(classes))
    blobs = torch.nn.functional.interpolate(
        torch.rand((1, 3, 4, 4), generator=g), size=size, mode="bilinear"
    )[0]
    image = (blobs * 200 + torch.rand((3, *size), generator=g) * 55).to(torch.uint8)
    # the view's own detection targets (read for view 1): here the same objects
    targets = Instances(
        size, gt_boxes=Boxes(inst.gt_boxes.tensor.clone()), gt_classes=inst.gt_classes.clone()
    )
    return {"image": image, "instances": inst, "targets": targets}


def batch():
    b1 = [[4, 4, 30, 30], [20, 10, 60, 40], [0, 30, 20, 60]]
    b2 = [[10, 6, 40, 36], [30, 14, 64, 44], [2, 20, 18, 50]]
    return [
        {"view1": view(0, (64, 64), b1, [0, 1, 1]), "view2": view(1, (56, 64), b2, [0, 1, 1])},
        {"view1": view(2, (48, 64), b1[:2], [2, 1]), "view2": view(3, (64, 60), b2[:2], [2, 1])},
    ]


# Training-set dicts for the class statistics: class 4 is rare (r_c^ins > 1 at t = 0.5).
STATS = [{"annotations": [{"category_id": c} for c in (0, 1, 1, 2, 3)]}] * 9 + [
    {"annotations": [{"category_id": 4}]}
]


def build(*opts):
    """The tiny DRCL2 (same weights every call); with DRB, the schedule and class statistics
    handed over (as drcl2's Trainer does)."""
    torch.manual_seed(0)
    cfg = tiny_cfg("DATALOADER.DRCL2.REPEAT_THRESHOLD", 0.5, *opts)
    return hand_over_drb(build_model(cfg).train(), cfg)


def hand_over_drb(model, cfg):
    """What drcl2's Trainer hands a DRCL2 model with DRB on: the schedule and class statistics."""
    if model.drb:
        model.rebalance_schedule = build_rebalance_schedule(cfg)
        model.set_class_statistics(STATS)
    return model


def step(model, iteration=0):
    with EventStorage(iteration) as storage:
        losses = model(batch())
    return losses, storage


def step_data(model, data, iteration=0):
    with EventStorage(iteration):
        return model(data)


# Parts off where a test does not need them (a faster step).
NO_AR, NO_SR, NO_RPN = (
    ["MODEL.DRCL2.AR.ENABLED", False],
    ["MODEL.DRCL2.SR.ENABLED", False],
    ["MODEL.DRCL2.RPN.ENABLED", False],
)
