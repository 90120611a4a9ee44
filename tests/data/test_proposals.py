"""LCL's proposal boxes (MODEL.DRCL2.LCL.BOX_SOURCE "proposals"): proposal files, labelling, the
mapper carrying proposals through both views, and the model's use of unlabelled proposals."""

import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from helpers.mapper import FixedCrop, record, write_image
from helpers.model import tiny_cfg, view

from drcl2.data.proposals import (
    check_proposal_files,
    label_proposals,
    read_proposal_file,
    top_proposals,
)
from drcl2.data.rebalance import sample_instances
from drcl2.data.two_view_mapper import TwoViewDatasetMapper


def test_label_proposals_takes_the_class_of_the_best_overlap_from_the_threshold():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=np.float64)
    classes = np.array([3, 7])
    proposals = np.array(
        [
            [0, 0, 10, 12],  # IoU 10/12 = 0.83 with box 0 -> class 3
            [0, 0, 10, 25],  # IoU 0.4 with box 0 -> unlabelled
            [18, 0, 30, 10],  # IoU 0.83 with box 1 -> class 7
            [5, 0, 25, 10],  # IoU 0.2 with both -> unlabelled
            [50, 50, 60, 60],  # nothing
        ],
        dtype=np.float64,
    )
    assert label_proposals(proposals, gt, classes, 0.5).tolist() == [3, -1, 7, -1, -1]
    assert label_proposals(proposals, gt, classes, 0.15).tolist() == [
        3,
        3,
        7,
        3,
        -1,
    ]  # tie -> first
    assert label_proposals(proposals, np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == [-1] * 5


def test_top_proposals_by_objectness_in_xyxy():
    d = {
        "proposal_boxes": np.array([[0, 0, 5, 5], [1, 1, 2, 3], [4, 4, 1, 1]], dtype=np.float32),
        "proposal_objectness_logits": np.array([0.1, 2.0, 1.0], dtype=np.float32),
        "proposal_bbox_mode": BoxMode.XYWH_ABS,
    }
    assert top_proposals(d, 2).tolist() == [[1, 1, 3, 4], [4, 4, 5, 5]]
    assert len(top_proposals(d, 10)) == 3


def proposal_record(path):
    r = record(path)
    # BOXES of test_two_view_mapper: (8, 8, 40, 40) class 0, (60, 10, 100, 50) class 1,
    # (20, 70, 70, 110) class 2, (90, 80, 120, 120) class 3
    r["proposal_boxes"] = np.array(
        [
            [8, 8, 40, 41],  # ~ box 0 -> class 0, kept (inside both crops)
            [0, 0, 30, 30],  # unlabelled, kept
            [66, 0, 100, 30],  # outside view 1's crop (x < 64) -> dropped
            [20, 70, 70, 112],  # ~ box 2 -> class 2, 88% / 75% visible -> kept
            [1, 1, 3, 3],  # lowest objectness: beyond the top 4
        ],
        dtype=np.float32,
    )
    r["proposal_objectness_logits"] = np.array([5, 4, 3, 2, 1], dtype=np.float32)
    r["proposal_bbox_mode"] = BoxMode.XYXY_ABS
    return r


def test_mapper_carries_proposals_through_both_views_with_the_survival_rule(tmp_path):
    path, _ = write_image(tmp_path)
    kwargs = dict(
        geometric1=[FixedCrop(0, 0, 64, 128)],
        geometric2=[FixedCrop(0, 0, 128, 100)],
        image_format="BGR",
        min_visible=0.3,
        min_side=4,
    )
    plain = TwoViewDatasetMapper(**kwargs)(proposal_record(path))
    out = TwoViewDatasetMapper(proposal_topk=4, proposal_match_iou=0.5, **kwargs)(
        proposal_record(path)
    )
    assert "proposals" not in plain["view1"]
    for v in ("view1", "view2"):
        # the annotated instances are the same with or without proposals (the RPN term uses them)
        assert (
            out[v]["instances"].gt_ids.tolist() == plain[v]["instances"].gt_ids.tolist() == [0, 2]
        )
        assert torch.equal(
            out[v]["instances"].gt_boxes.tensor, plain[v]["instances"].gt_boxes.tensor
        )
        p = out[v]["proposals"]
        assert p.image_size == out[v]["instances"].image_size
        assert p.gt_classes.tolist() == [0, -1, 2]
    assert out["view1"]["proposals"].proposal_boxes.tensor.tolist() == [
        [8, 8, 40, 41],
        [0, 0, 30, 30],
        [20, 70, 64, 112],
    ]  # clipped to view 1's crop
    assert out["view2"]["proposals"].proposal_boxes.tensor[2].tolist() == [20, 70, 70, 100]
    with pytest.raises(ValueError, match="MODEL.LOAD_PROPOSALS"):
        TwoViewDatasetMapper(proposal_topk=4, **kwargs)(record(path))


def test_unlabelled_instances_weigh_one_in_the_draws():
    # class weights favour the last class 1000:1; an unlabelled instance (-1) must weigh 1, not
    # the last class's weight (negative indexing).
    weights = torch.tensor([1.0, 1000.0])
    classes = torch.tensor([-1, 0, 1])
    g = torch.Generator().manual_seed(0)
    firsts = [int(sample_instances(classes, weights, 1, g)) for _ in range(400)]
    assert firsts.count(2) > 380 and firsts.count(0) < 10


@pytest.fixture
def tiny_dataset():
    name = "drcl2_test_proposal_ids"
    DatasetCatalog.register(name, lambda: [{"image_id": 1}, {"image_id": 2}, {"image_id": 3}])
    yield name
    DatasetCatalog.remove(name)


def write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


def test_bad_proposal_files_fail_naming_the_file(tmp_path, tiny_dataset):
    box = np.zeros((1, 4), np.float32)
    good = {
        "ids": [1, 2, 3],
        "boxes": [box] * 3,
        "objectness_logits": [np.zeros(1, np.float32)] * 3,
        "bbox_mode": int(BoxMode.XYXY_ABS),
    }
    check_proposal_files([tiny_dataset], [write(tmp_path / "good.pkl", good)])
    missing = write(tmp_path / "missing.pkl", {**good, "ids": [1, 2, 4]})
    with pytest.raises(ValueError, match=r"missing\.pkl.*1 image.*\[3\]"):
        check_proposal_files([tiny_dataset], [missing])
    relative = write(tmp_path / "relative.pkl", {**good, "bbox_mode": int(BoxMode.XYXY_REL)})
    with pytest.raises(ValueError, match=r"relative\.pkl.*bbox_mode"):
        check_proposal_files([tiny_dataset], [relative])
    bogus = write(tmp_path / "bogus.pkl", {**good, "bbox_mode": 17})
    with pytest.raises(ValueError, match=r"bogus\.pkl.*bbox_mode"):
        read_proposal_file(bogus)
    no_logits = write(tmp_path / "no_logits.pkl", {"ids": [1], "boxes": [box]})
    with pytest.raises(ValueError, match=r"no_logits\.pkl.*objectness_logits"):
        read_proposal_file(no_logits)
    flat = write(tmp_path / "flat.pkl", {**good, "boxes": [np.zeros(4)] * 3})
    with pytest.raises(ValueError, match=r"flat\.pkl.*\[R, 4\]"):
        read_proposal_file(flat)
    with pytest.raises(ValueError, match=r"nowhere\.pkl.*does not exist"):
        read_proposal_file(str(tmp_path / "nowhere.pkl"))
    with pytest.raises(ValueError, match="one proposal file per dataset"):
        check_proposal_files([tiny_dataset], [])


# --- the model ---------------------------------------------------------------------------------
GT1 = [[4, 4, 30, 30], [20, 10, 60, 40], [0, 30, 20, 60]]
GT2 = [[10, 6, 40, 36], [30, 14, 64, 44], [2, 20, 18, 50]]
EXTRA1 = [[30, 30, 60, 60], [0, 0, 16, 16]]  # unlabelled proposals
EXTRA2 = [[26, 28, 58, 60], [4, 2, 20, 18]]


def proposal_batch(extra_classes=(-1, -1)):
    """Two images; view i's proposals = its annotated boxes (same classes) + two more boxes."""
    data = []
    for seed, classes in ((0, [0, 1, 1]), (2, [2, 1, 3])):
        item = {
            "view1": view(seed, (64, 64), GT1, classes),
            "view2": view(seed + 1, (56, 64), GT2, classes),
        }
        for v, extra in (("view1", EXTRA1), ("view2", EXTRA2)):
            inst = item[v]["instances"]
            item[v]["proposals"] = Instances(
                inst.image_size,
                proposal_boxes=Boxes(
                    torch.cat([inst.gt_boxes.tensor, torch.tensor(extra, dtype=torch.float32)])
                ),
                gt_classes=torch.cat([inst.gt_classes, torch.tensor(extra_classes)]),
            )
        data.append(item)
    return data


# LCL's boxes from proposals: the keys the start-up checks ask for (the file is never read here).
PROPOSAL_OPTS = (
    "MODEL.LOAD_PROPOSALS", True,
    "MODEL.DRCL2.LCL.BOX_SOURCE", "proposals",
    "DATASETS.PROPOSAL_FILES_TRAIN", ("unused.pkl",),
)  # fmt: skip


def lcl_model(*opts):
    """LCL and RPN only, no batch statistics in the MLPs (an instance's embedding does not depend
    on which other instances are in the batch), K = 8 (every box is drawn)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        "MODEL.DRCL2.AR.ENABLED",
        False,
        "MODEL.DRCL2.SR.ENABLED",
        False,
        "MODEL.DRCL2.DRB.ENABLED",
        False,
        "DATALOADER.SAMPLER_TRAIN",
        "RepeatFactorTrainingSampler",
        "MODEL.DRCL2.HEAD_NORM",
        "",
        *opts,
    )
    model = build_model(cfg)
    model.train()
    return model


def test_unlabelled_proposals_join_the_instance_term_but_not_the_supervised_one(one_thread):
    gt_model = lcl_model()
    proposal_model = lcl_model(*PROPOSAL_OPTS)
    assert proposal_model.box_source == "proposals"
    with EventStorage(0):
        torch.manual_seed(1)  # the RPN samples its anchors from the global generator
        gt = gt_model(proposal_batch())
        torch.manual_seed(1)
        prop = proposal_model(proposal_batch())
    # L_sup sees the labelled proposals only: here exactly the annotated boxes.
    assert prop["loss_lcl_sup"].item() == pytest.approx(gt["loss_lcl_sup"].item(), rel=1e-5)
    # L_inst also averages over the 4 unlabelled proposals, so it differs.
    assert abs(prop["loss_lcl_inst"].item() - gt["loss_lcl_inst"].item()) > 1e-4
    # The RPN term keeps the annotated boxes.
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        assert prop[k].item() == pytest.approx(gt[k].item(), rel=1e-5)
    # Labelled extra boxes do enter L_sup.
    with EventStorage(0):
        labelled = lcl_model(*PROPOSAL_OPTS)(proposal_batch((0, 1)))
    assert abs(labelled["loss_lcl_sup"].item() - gt["loss_lcl_sup"].item()) > 1e-4


def test_all_unlabelled_proposals_give_a_zero_supervised_term_with_gradients(one_thread):
    model = lcl_model(*PROPOSAL_OPTS)
    data = proposal_batch()
    for item in data:
        for v in ("view1", "view2"):
            item[v]["proposals"].gt_classes[:] = -1
    with EventStorage(0):
        losses = model(data)
    assert losses["loss_lcl_sup"].item() == 0.0 and losses["loss_lcl_inst"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.heads["lcl"].predictor.parameters())


def test_proposal_box_source_needs_the_proposal_keys():
    from drcl2.engine.checks import check_drcl2_config

    cfg = tiny_cfg("MODEL.DRCL2.LCL.BOX_SOURCE", "proposals")
    with pytest.raises(ValueError, match="MODEL.LOAD_PROPOSALS"):
        check_drcl2_config(cfg)
    cfg.merge_from_list(["MODEL.LOAD_PROPOSALS", True])
    with pytest.raises(ValueError, match="DATASETS.PROPOSAL_FILES_TRAIN"):
        check_drcl2_config(cfg)
    with pytest.raises(ValueError, match="BOX_SOURCE"):
        check_drcl2_config(tiny_cfg("MODEL.DRCL2.LCL.BOX_SOURCE", "selective_search"))
    model = lcl_model(*PROPOSAL_OPTS)
    data = proposal_batch()
    del data[1]["view2"]["proposals"]
    with pytest.raises(ValueError, match="no view2 'proposals'"):
        with EventStorage(0):
            model(data)


def test_unlabelled_proposals_weigh_one_in_box_guided_masking(monkeypatch, one_thread):
    """With DRB weights far from 1 (iteration 8 of 10, a rare class), the masking weight of an
    unlabelled proposal is 1 and that of a labelled one w_c(lambda). Catches: class -1 indexing the
    last class's weight."""
    from helpers.model import hand_over_drb

    from drcl2.modeling import draws

    calls = []
    original = draws.box_guided_patch_mask
    monkeypatch.setattr(
        draws, "box_guided_patch_mask", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    torch.manual_seed(0)
    cfg = tiny_cfg(
        "DATALOADER.DRCL2.REPEAT_THRESHOLD",
        0.5,
        *PROPOSAL_OPTS,
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        "MODEL.DRCL2.SR.ENABLED",
        False,
        "MODEL.DRCL2.RPN.ENABLED",
        False,
        "MODEL.DRCL2.LCL.NUM_INSTANCES",
        8,
    )
    model = hand_over_drb(build_model(cfg).train(), cfg)
    data = proposal_batch()
    for (
        item
    ) in data:  # the last class (4) is the rare one: a -1 read as index -1 would take its weight
        for v in ("view1", "view2"):
            item[v]["proposals"].gt_classes[0] = 4
    with EventStorage(8):
        model(data)
    w = model.class_weights_at(0.8)
    assert w[4] > 2.5
    assert len(calls) == 2
    for args, item in zip(calls, data):
        classes = item["view1"]["proposals"].gt_classes  # K = 8 >= 5 proposals: all drawn, in order
        box_weights = args[4]
        expected = torch.where(classes >= 0, w[classes.clamp(min=0)], torch.ones(()))
        assert sorted(box_weights.tolist()) == pytest.approx(sorted(expected.tolist()))
        assert (box_weights == 1).sum() >= 2  # the two unlabelled proposals
