"""One-stage fine-tuning: ATSS (sample selection, losses, inference), detectron2's RetinaNet and
FCOS
from yacs configs, the 2DRCL export loading into each, and a toy ATSS fine-tune + evaluation."""

import logging
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_anchor_generator, build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from fvcore.nn import giou_loss
from helpers import REPO_ROOT, cfg_from

import train_net
from drcl2.export import FINETUNE_PREFIXES, export_finetune_weights
from drcl2.modeling import ATSS, FCOS
from drcl2.modeling.atss import atss_match, centerness_targets
from drcl2.tools.summarize import read_eval_metrics


def _square(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def _boxes(*squares):
    return Boxes(torch.tensor([_square(*s) for s in squares], dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# Adaptive training sample selection, on hand-built cases
# ------------------------------------------------------------------------------------------------
def test_atss_iou_threshold_is_mean_plus_std_of_the_candidates():
    # GT [0, 0, 20, 20]; anchors of side 20. The 4 closest centres (distances 0, 2, 4, 7) are the
    # candidates, IoUs 1, 0.818, 2/3, 0.4815: threshold = mean 0.7416 + std 0.2205 = 0.962, so only
    # the first is positive (the mean alone would take the second too, a fixed IoU threshold of
    # 0.5 as RetinaNet's the third as well). The last two (distances 20, 15) are not candidates.
    anchors = _boxes(
        (10, 10, 20), (12, 10, 20), (14, 10, 20), (10, 17, 20), (30, 10, 20), (10, 25, 20)
    )
    gt = Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    assert atss_match([anchors], gt, topk=4).tolist() == [0, -1, -1, -1, -1, -1]


def test_atss_candidates_are_the_k_closest_of_each_level():
    # GT [0, 0, 40, 40] (centre (20, 20)). Fine level: 8 px anchors at distances 0, 1, 1, 14 (IoU
    # 0.04 each); coarse level: 40 px anchors at distances 2 and 40 (IoU 0.905 and 0).
    # Per level top-3: candidates = 3 fine + 2 coarse, threshold 0.205 + 0.392 = 0.597: only the
    # near coarse anchor. (A top-3 over all levels at once would take three fine anchors, all
    # at IoU 0.04 = their mean + 0 std, and make them the positives.)
    fine = _boxes((20, 20, 8), (21, 20, 8), (20, 21, 8), (10, 10, 8))
    coarse = _boxes((22, 20, 40), (60, 20, 40))
    gt = Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0]]))
    assert atss_match([fine, coarse], gt, topk=3).tolist() == [-1, -1, -1, -1, 0, -1]


def test_atss_positive_centre_must_lie_inside_the_box():
    # GT [0, 0, 10, 40]; 40 px anchors. Candidates' IoUs 0.25, 0.081, 0.081: threshold 0.235, which
    # the first passes, but its centre (12, 20) is outside the box: no positive at all.
    anchors = _boxes((12, 20, 40), (5, 45, 40), (5, -5, 40), (80, 20, 40))
    gt = Boxes(torch.tensor([[0.0, 0.0, 10.0, 40.0]]))
    ious = pairwise_iou(anchors, gt)[:3, 0]
    assert ious[0] >= ious.mean() + ious.std()  # the IoU rule alone would take it
    assert atss_match([anchors], gt, topk=3).tolist() == [-1, -1, -1, -1]


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_atss_anchor_claimed_by_two_boxes_takes_the_higher_iou(order):
    # a 16 x 16 grid of 32 px anchors, stride 8, and two overlapping boxes of different sizes
    centers = [(4 + 8 * i, 4 + 8 * j) for j in range(16) for i in range(16)]
    anchors = _boxes(*[(x, y, 32) for x, y in centers])
    gts = Boxes(torch.tensor([[20.0, 20.0, 60.0, 60.0], [24.0, 20.0, 56.0, 52.0]])[order])
    alone = [atss_match([anchors], gts[[i]], topk=9) >= 0 for i in range(2)]  # selection per box
    both = alone[0] & alone[1]
    ious = pairwise_iou(anchors, gts)
    assert both.any()  # the case exists: anchors positive for both boxes, here with IoU 0.64 / 0.78
    assert (ious[both].max(dim=1).values > ious[both].min(dim=1).values).all()
    matched = atss_match([anchors], gts, topk=9)
    assert torch.equal(matched[both], ious[both].argmax(dim=1))
    assert (matched[alone[0] & ~alone[1]] == 0).all() and (matched[alone[1] & ~alone[0]] == 1).all()
    assert (matched[~alone[0] & ~alone[1]] == -1).all()


def test_atss_match_without_boxes_is_all_background():
    anchors = _boxes((4, 4, 32), (12, 4, 32))
    assert atss_match([anchors], Boxes(torch.zeros((0, 4)))).tolist() == [-1, -1]


def test_centerness_targets():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    points = torch.tensor([[5.0, 5.0], [1.0, 5.0], [1.0, 2.0]])
    # l/r = 1/9 (and t/b = 1 or 2/8): sqrt(1/9) and sqrt(1/9 * 1/4)
    assert torch.allclose(centerness_targets(points, boxes), torch.tensor([1.0, 1 / 3, 1 / 6]))


# ------------------------------------------------------------------------------------------------
# The ATSS model: losses, inference, config errors
# ------------------------------------------------------------------------------------------------
TOY_ATSS = "configs/toy/atss_finetune.yaml"


@pytest.fixture(scope="module")
def toy_atss():
    torch.manual_seed(0)
    model = build_model(cfg_from(TOY_ATSS))
    assert isinstance(model, ATSS)
    return model


@pytest.mark.parametrize("config", [TOY_ATSS, "configs/LVISv1/atss_R_50_FPN_1x.yaml"])
def test_atss_anchors_are_centred_in_their_cells(config):
    # ATSS selects candidates by the distance of anchor centres to box centres and keeps those
    # whose centre lies inside the box: a corner offset (detectron2's default) moves both by half
    # a stride (4 px at P3).
    cfg = cfg_from(config)
    anchors = build_anchor_generator(
        cfg, [ShapeSpec(channels=8, stride=s) for s in (8, 16, 32, 64, 128)]
    )
    p3 = anchors([torch.zeros(1, 8, 4, 4)] + [torch.zeros(1, 8, 1, 1)] * 4)[0]
    assert p3.get_centers()[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]


def _gt(boxes, classes, size=(128, 128)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_atss_box_loss_is_centerness_weighted_giou_times_two(toy_atss, one_thread):
    model = toy_atss
    features = [torch.zeros(1, 128, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    anchors = model.anchor_generator(features)
    gt = _gt([[20.0, 24.0, 60.0, 50.0], [70.0, 70.0, 100.0, 120.0]], [3, 7])
    labels, matched = model.label_anchors(anchors, [gt])
    pos = labels[0] != model.num_classes
    assert pos.sum() >= 2 and set(labels[0][pos].tolist()) == {3, 7}
    all_anchors = Boxes.cat(anchors).tensor
    R, K = len(all_anchors), model.num_classes
    exact = model.box2box_transform.get_deltas(all_anchors, matched[0])  # (R, 4): perfect boxes
    shift = torch.zeros(R, 4)
    shift[:, 0] = 0.5  # dx: boxes shifted right by 5% of the anchor width (weights 10)
    ctr = torch.zeros(R, 1)
    logits = torch.full((R, K), -4.0)

    def split(x):  # one "level" holding all anchors is enough for the loss
        return [x[None]]

    with EventStorage():
        perfect = model.losses(anchors, split(logits), labels, split(exact), matched, split(ctr))
        shifted = model.losses(
            anchors, split(logits), labels, split(exact + shift), matched, split(ctr)
        )
    assert perfect["loss_box_reg"].item() == pytest.approx(0.0, abs=1e-5)
    centers = Boxes(all_anchors[pos]).get_centers()
    w = centerness_targets(centers, matched[0][pos])
    pred = model.box2box_transform.apply_deltas((exact + shift)[pos], all_anchors[pos])
    expected = 2.0 * (giou_loss(pred, matched[0][pos]) * w).sum() / w.sum()
    assert shifted["loss_box_reg"].item() == pytest.approx(expected.item(), rel=1e-4)
    # centerness: BCE of logit 0 (p = 0.5) against the targets, over the number of positives
    bce = torch.nn.functional.binary_cross_entropy(torch.full_like(w, 0.5), w, reduction="sum")
    expected_ctr = bce / pos.sum()
    assert perfect["loss_centerness"].item() == pytest.approx(expected_ctr.item(), rel=1e-4)


def test_atss_trains_and_infers_on_a_batch(toy_atss, one_thread):
    model = toy_atss
    model.train()
    image = torch.randint(0, 255, (3, 96, 128)).float()
    inputs = [
        {"image": image, "instances": _gt([[10.0, 10.0, 40.0, 50.0]], [1], (96, 128))},
        {"image": image, "instances": _gt(torch.zeros((0, 4)).tolist(), [], (96, 128))},
    ]
    with EventStorage():
        losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_centerness"}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.scales.grad is not None and model.head.centerness.weight.grad is not None
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 192, "width": 256}])
    inst = out["instances"]
    assert inst.image_size == (192, 256) and 0 < len(inst) <= model.max_detections_per_image
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    model.train()


def test_atss_inference_thresholds_probability_and_scores_sqrt_of_centerness(toy_atss, monkeypatch):
    model = toy_atss
    monkeypatch.setattr(model, "test_score_thresh", 0.05)  # the paper's (the toy config: 1e-4)
    anchors = [_boxes((10, 10, 8), (50, 10, 8), (90, 10, 8))]  # far apart: NMS keeps all
    probs = [torch.tensor([[0.9, 0.01], [0.04, 0.5], [0.3, 0.2]])]
    ctr = [torch.tensor([[0.25], [1.0], [0.01]])]
    deltas = [torch.zeros(3, 4)]
    # candidates: probability > 0.05 (location 1, class 0 has sqrt(0.04 * 1) = 0.2 but is out)
    out = model.inference_single_image(anchors, probs, deltas, ctr, (100, 100))
    assert out.pred_classes.tolist() == [1, 0, 0, 1]
    expected = torch.tensor([0.5, 0.225, 0.003, 0.002]).sqrt()
    assert torch.allclose(out.scores, expected)
    assert torch.allclose(out.pred_boxes.tensor[:2], anchors[0].tensor[[1, 0]])  # zero deltas
    monkeypatch.setattr(model, "test_topk_candidates", 2)  # ranked by probability x centerness
    out = model.inference_single_image(anchors, probs, deltas, ctr, (100, 100))
    assert out.pred_classes.tolist() == [1, 0]
    monkeypatch.setattr(model, "max_detections_per_image", 1)
    out = model.inference_single_image(anchors, probs, deltas, ctr, (100, 100))
    assert out.pred_classes.tolist() == [1]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.ATSS.IN_FEATURES", "['p2', 'p3']"], "MODEL.ATSS.IN_FEATURES .* names \\['p2'\\]"),
        (["MODEL.ATSS.TOPK", "0"], "MODEL.ATSS.TOPK must be >= 1"),
        (
            ["MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 40], [64], [128], [256], [512]]"],
            "MODEL.ANCHOR_GENERATOR",
        ),
        (
            ["MODEL.FPN.IN_FEATURES", "['res3', 'res4']"],
            "MODEL.FPN.IN_FEATURES must include 'res5'",
        ),
    ],
)
def test_atss_bad_config_names_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg_from(TOY_ATSS, *opts))


def test_fcos_bad_in_features_names_the_key():
    with pytest.raises(ValueError, match="MODEL.FCOS.IN_FEATURES"):
        build_model(cfg_from("configs/toy/fcos_finetune.yaml", "MODEL.FCOS.IN_FEATURES", "['p2']"))


def test_fcos_from_config_maps_the_keys():
    model = build_model(
        cfg_from(
            "configs/toy/fcos_finetune.yaml",
            "MODEL.FCOS.CENTER_SAMPLING_RADIUS",
            "2.5",
            "MODEL.FCOS.NMS_THRESH_TEST",
            "0.55",
            "MODEL.FCOS.NUM_CONVS",
            "2",
        )
    )
    assert isinstance(model, FCOS)
    assert (
        model.num_classes == 30
        and model.center_sampling_radius == 2.5
        and model.test_nms_thresh == 0.55
    )
    assert model.test_score_thresh == pytest.approx(1e-4) and model.max_detections_per_image == 50
    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    convs = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 2 and len(norms) == 2


# ------------------------------------------------------------------------------------------------
# The 2DRCL export loads into each one-stage detector: only the heads and the P6/P7 convs are fresh
# ------------------------------------------------------------------------------------------------
# what the export has and the one-stage detectors do not: the RPN, the box head, and the FPN's P2
# (lateral and output convs of res2: the one-stage FPNs start at res3)
UNUSED = (
    "proposal_generator.",
    "roi_heads.box_head.",
    "backbone.fpn_lateral2.",
    "backbone.fpn_output2.",
)
# what the one-stage detectors have and the export does not: the dense head and the P6/P7 convs
FRESH = ("head.", "backbone.top_block.")
ONE_STAGE = {
    "R-50 LVIS": ("configs/pretrain_2drcl.yaml", ["configs/LVISv1/atss_R_50_FPN_1x.yaml",
                                                 "configs/LVISv1/retinanet_R_50_FPN_1x.yaml",
                                                 "configs/LVISv1/fcos_R_50_FPN_1x.yaml"]),
    "toy": ("configs/toy/pretrain_2drcl.yaml", ["configs/toy/atss_finetune.yaml",
                                               "configs/toy/retinanet_finetune.yaml",
                                               "configs/toy/fcos_finetune.yaml"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per pre-training config, the exported fine-tuning weights of a DRCL2 model (nudged off
    init)."""
    out = {}
    for name, (pretrain, _) in ONE_STAGE.items():
        folder = tmp_path_factory.mktemp("export")
        torch.manual_seed(0)
        model = build_model(cfg_from(pretrain))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.startswith(FINETUNE_PREFIXES):
                    p.add_(0.01)
        DetectionCheckpointer(model, str(folder)).save("model_final")
        out[name] = export_finetune_weights(
            str(folder / "model_final.pth"), str(folder / "finetune.pth")
        )
        out[name + "/path"] = str(folder / "finetune.pth")
        del model
    return out


@pytest.mark.parametrize(
    "setting, config", [(s, c) for s, (_, configs) in ONE_STAGE.items() for c in configs]
)
def test_export_loads_into_one_stage_detector(exports, setting, config, caplog):
    exported = exports[setting]
    detector = build_model(cfg_from(config))
    state = detector.state_dict()
    missing = sorted(k for k in state if k not in exported)
    unexpected = sorted(k for k in exported if k not in state)
    # nothing but the heads / P6-P7 is missing, nothing but RPN / box head / P2 is left over
    assert all(k.startswith(FRESH) for k in missing), [
        k for k in missing if not k.startswith(FRESH)
    ]
    assert any(k.startswith("backbone.top_block.p6") for k in missing)
    assert all(k.startswith(UNUSED) for k in unexpected), [
        k for k in unexpected if not k.startswith(UNUSED)
    ]
    assert any(k.startswith("backbone.fpn_lateral2") for k in unexpected)
    loaded = set(exported) & set(state)
    assert any(k.startswith("backbone.bottom_up.res5") for k in loaded)
    assert any(k.startswith("backbone.fpn_output3") for k in loaded)

    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(detector).load(exports[setting + "/path"], checkpointables=[])
    assert "shape" not in caplog.text.lower(), caplog.text
    state = detector.state_dict()
    for k in loaded:
        assert torch.equal(state[k], exported[k]), k


# ------------------------------------------------------------------------------------------------
# Toy ATSS fine-tune + LVIS evaluation through train_net.py, from a 2DRCL export
# ------------------------------------------------------------------------------------------------
def test_toy_atss_finetune_and_evaluate(exports, toy_val_mini, tmp_path, one_thread):
    args = default_argument_parser().parse_args(
        [
            "--config-file", f"{REPO_ROOT}/{TOY_ATSS}",
            "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", "0",
            "MODEL.WEIGHTS", exports["toy/path"],
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "3",
            "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "96",
            "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "96",
            "DATASETS.TEST", f"('{toy_val_mini}',)",
            "OUTPUT_DIR", str(tmp_path),
        ]
    )  # fmt: skip
    train_net.main(args)
    results = read_eval_metrics(str(tmp_path))
    assert set(results) == {"bbox"}  # a box-only detector: no mask evaluation
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert math.isfinite(results["bbox"][key]) and results["bbox"][key] >= 0, key
    # the backbone started from the export: 3 warm-up steps (lr <= 1e-3 x 0.01) barely move it
    trained = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    key = "backbone.bottom_up.res2.0.conv1.weight"
    assert (trained[key] - exports["toy"][key]).abs().max() < 1e-3
    assert (tmp_path / "inference" / "lvis_instances_results.json").is_file()


def _mean_over_two_workers(rank, init_file, results):
    import torch.distributed as dist

    from drcl2.modeling.atss import _mean_over_workers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = _mean_over_workers(float(rank * 4 + 1))  # 1 and 5
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend, so CPU processes cannot form a process group",
)
def test_atss_normalizers_are_averaged_over_processes(tmp_path):
    """The loss normalisers (positives, centerness sum) are the mean over the processes, as the
    paper's code: each process gets the same normaliser."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_mean_over_two_workers, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: 3.0, 1: 3.0}
