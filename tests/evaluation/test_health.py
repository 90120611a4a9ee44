"""The health probe of pre-trained weights: its maths, the probe tool and the training hook."""

import csv
import json

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import cfg_from

from drcl2.evaluation.health import (
    accuracies,
    embedding_std,
    linear_probe,
    nearest_centroid,
    rankme,
    stage_changes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def class_features(n_per_class=20, num_classes=6, dim=16, noise=0.3, seed=0):
    """Features that encode the class (a class direction plus noise), and their labels."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return directions[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_rank_of_constant_low_rank_and_spread_features():
    g = torch.Generator().manual_seed(0)
    assert rankme(torch.ones(100, 32) * 3.0) == pytest.approx(1.0, abs=1e-3)
    assert rankme(torch.zeros(10, 8)) == 1.0
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].t()  # 3 orthonormal rows
    three = torch.cat([basis * 5.0] * 10)  # three equal singular values
    assert rankme(three) == pytest.approx(3.0, abs=1e-3)
    spread = rankme(torch.randn(4000, 32, generator=g))
    assert 28 < spread <= 32


def test_embedding_std_sees_collapse():
    g = torch.Generator().manual_seed(0)
    assert embedding_std(torch.ones(50, 16) + 1e-9 * torch.randn(50, 16, generator=g)) < 1e-6
    assert embedding_std(torch.randn(5000, 64, generator=g)) == pytest.approx(1.0, abs=0.05)
    # one shared direction plus a little noise: most of it collapsed
    shared = torch.randn(1, 64, generator=g) * 10
    assert embedding_std(shared + torch.randn(500, 64, generator=g)) < 0.2


def test_probe_reads_the_class_when_features_encode_it():
    x, y = class_features(seed=0)
    xt, yt = class_features(seed=0, n_per_class=10)  # same directions, new noise
    g = torch.Generator().manual_seed(1)
    xt = xt + 0.0 * torch.randn(xt.shape, generator=g)
    for predicted in (linear_probe(x, y, xt, 6), nearest_centroid(x, y, xt, 6)):
        assert accuracies(predicted, yt)["balanced"] > 0.9


def test_constant_features_give_a_chance_level_probe():
    x = torch.ones(120, 16)
    y = torch.arange(6).repeat_interleave(20)
    predicted = linear_probe(x, y, torch.ones(60, 16), 6)
    truth = torch.arange(6).repeat_interleave(10)
    assert accuracies(predicted, truth)["balanced"] == pytest.approx(1 / 6)


def test_random_labels_are_not_learned():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    y, yt = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (300,), generator=g)
    assert accuracies(linear_probe(x, y, xt, 6), yt)["balanced"] < 0.3


def test_balanced_accuracy_per_group_weighs_classes_not_boxes():
    truth = torch.tensor([0] * 8 + [1, 2])
    predicted = torch.tensor([0] * 8 + [0, 2])  # the frequent class right, one rare wrong
    acc = accuracies(predicted, truth, groups=["f", "r", "r"])
    assert acc["top1"] == pytest.approx(0.9)
    assert acc["balanced"] == pytest.approx(2 / 3)
    assert (
        acc["balanced_f"] == 1.0
        and acc["balanced_r"] == 0.5
        and acc["balanced_c"] != acc["balanced_c"]
    )


def test_stage_changes_against_the_initialisation():
    init = {
        "backbone.bottom_up.res2.0.conv1.weight": torch.ones(4, 4, 3, 3),
        "backbone.bottom_up.res2.0.conv1.norm.weight": torch.ones(4),
        "backbone.bottom_up.res2.0.conv1.norm.bias": torch.zeros(4),
        "roi_heads.box_head.fc1.weight": torch.ones(8, 4),
    }
    same = stage_changes(init, init)
    assert same["res2"] == {"weight_norm_ratio": 1.0, "weight_change": 0.0, "affine_change": 0.0}
    moved = dict(init)
    moved["backbone.bottom_up.res2.0.conv1.weight"] = (
        2 * init["backbone.bottom_up.res2.0.conv1.weight"]
    )
    moved["backbone.bottom_up.res2.0.conv1.norm.weight"] = torch.full((4,), 1.5)
    changes = stage_changes(moved, init)
    assert changes["res2"]["weight_norm_ratio"] == pytest.approx(2.0)
    assert changes["res2"]["weight_change"] == pytest.approx(1.0)
    assert changes["res2"]["affine_change"] == pytest.approx(0.5)
    assert changes["box_head"]["weight_change"] == 0.0
    assert (
        changes["res5"]["weight_change"] != changes["res5"]["weight_change"]
    )  # NaN: no such tensors


def test_probe_tool_tells_collapsed_weights_from_random_ones(toy_val_mini, tmp_path, capsys):
    """A box head whose output is one constant vector (a collapsed head) has box rank ~1 and a
    chance-level box probe, where the random one does better; the table and files name both."""
    from detectron2.utils.env import seed_all_rng

    from drcl2.tools import probe

    cfg = cfg_from("configs/toy/mask_rcnn_finetune.yaml")
    seed_all_rng(cfg.SEED)  # the probe's "random" row: the config's own initialisation
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.roi_heads.box_head.named_parameters():
            p.zero_()
            if name.endswith("bias"):
                p.fill_(1.0)
    DetectionCheckpointer(model, str(tmp_path)).save("collapsed")
    out = tmp_path / "report"
    code = probe.main([
        "--config-file", "configs/toy/mask_rcnn_finetune.yaml", "--dataset", toy_val_mini,
        "--train-dataset", toy_val_mini, "--max-images", "8", "--max-train-images", "8",
        "--output-dir", str(out), "random", f"collapsed={tmp_path / 'collapsed.pth'}",
    ])  # fmt: skip
    assert code == 0
    with open(out / "probe.csv") as f:
        rows = {r["weights"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"random", "collapsed"}
    collapsed, random = rows["collapsed"], rows["random"]
    assert float(collapsed["rank_box"]) == pytest.approx(1.0, abs=0.01)
    assert float(collapsed["std_box"]) < 1e-6
    assert float(random["rank_box"]) > 3
    # trained and scored on the same boxes, the random features separate the classes; the constant
    # ones cannot
    assert float(random["probe_box_balanced"]) > float(collapsed["probe_box_balanced"])
    classes = len({a["category_id"] for a in json.load(open(_json(toy_val_mini)))["annotations"]})
    assert float(collapsed["probe_box_balanced"]) == pytest.approx(1 / classes)
    # the backbone was not touched: its features and weights are the random init's
    assert float(collapsed["rank_roi"]) == pytest.approx(float(random["rank_roi"]), rel=1e-6)
    assert (
        float(collapsed["res3_weight_change"]) == 0.0
        and float(collapsed["box_head_weight_change"]) == 1.0
    )
    printed = capsys.readouterr().out
    assert "| collapsed" in printed and "balanced-probe chance" in printed
    lines = (out / "probe.md").read_text().splitlines()
    assert sum(line.startswith("| random ") for line in lines) == 2  # a row in each table


def _json(name):
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(name).json_file


def test_probe_tool_names_a_missing_file(toy_val_mini, tmp_path, capsys):
    from drcl2.tools import probe

    code = probe.main(
        [
            "--config-file",
            "configs/toy/mask_rcnn_finetune.yaml",
            "--dataset",
            toy_val_mini,
            str(tmp_path / "nope.pth"),
        ]
    )
    assert code == 1 and "nope.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_health_hook_logs_without_changing_the_run(toy_val_mini, tmp_path):
    """The hook's figures reach metrics.json at its period, and the losses are those of the same run
    without the hook (it draws no global random numbers)."""
    from drcl2.tools.check_resume import losses_of_run

    def run(period, out):
        cfg = cfg_from(
            "configs/toy/pretrain_2drcl.yaml",
            "SOLVER.MAX_ITER",
            3,
            "OUTPUT_DIR",
            str(out),
            "DATALOADER.NUM_WORKERS",
            0,
            "SOLVER.CHECKPOINT_PERIOD",
            100,
            "TEST.HEALTH.PERIOD",
            period,
            "TEST.HEALTH.DATASET",
            toy_val_mini,
            "TEST.HEALTH.MAX_IMAGES",
            8,
        )
        return losses_of_run(cfg, resume=False)[1]

    with_hook = run(2, tmp_path / "on")
    without = run(0, tmp_path / "off")
    assert with_hook == without
    metrics = [json.loads(line) for line in open(tmp_path / "on" / "metrics.json")]
    health = [m for m in metrics if "health/rank_roi" in m]
    assert [m["iteration"] for m in health] == [
        1
    ]  # after iteration 1 (period 2); iteration 0 logs before training
    assert {"health/probe_roi", "health/probe_box", "health/std_box", "health/rank_p3"} <= set(
        health[0]
    )
    assert not any(
        "health/rank_roi" in m
        for m in (json.loads(x) for x in open(tmp_path / "off" / "metrics.json"))
    )


def test_health_hook_needs_a_dataset():
    from drcl2.engine.hooks import HealthProbeHook

    cfg = cfg_from(
        "configs/toy/pretrain_2drcl.yaml",
        "TEST.HEALTH.PERIOD",
        10,
        "TEST.HEALTH.DATASET",
        "",
    )
    with pytest.raises(ValueError, match="TEST.HEALTH.DATASET"):
        HealthProbeHook.from_config(cfg)
