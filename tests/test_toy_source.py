"""The toy source classification set and the supervised source pre-training of the toy backbone."""
import collections
import filecmp
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import REPO_ROOT, cfg_from
from drcl2.checkpoint import DRCL2Checkpointer
from drcl2.data.generated import ToySourceSpec, ensure_toy_source, generate_toy_source
from drcl2.data.datasets import check_dataset_files, register_toy_source
from drcl2.data.generated.toy_lvis import TOY_CLASSES
from drcl2.data.generated.toy_source import SOURCE_CLASSES, SOURCE_SHAPES, toy_source_layout
from drcl2.engine import Trainer
from drcl2.modeling import DRCL2
from drcl2.tools import source_pretrain
from drcl2.tools.source_pretrain import SourceClassifier, SourcePretrainSettings, ensure_source_weights

TINY = ToySourceSpec(num_train_per_class=2, num_val_per_class=1)
TOY_CONFIG = os.path.join(REPO_ROOT, "configs/toy/Base-RCNN-FPN-R18.yaml")
PREFIX = "backbone.bottom_up."


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """The tiny spec generated into a fresh root and registered as toy_source_tiny_{train,val}."""
    root = str(tmp_path_factory.mktemp("source_a"))
    paths = generate_toy_source(root, TINY)
    names = {"toy_source_tiny_train": "train", "toy_source_tiny_val": "val"}
    if "toy_source_tiny_train" not in DatasetCatalog.list():
        register_toy_source(root, TINY, names=names)
    return paths


def test_same_spec_gives_identical_bytes(tiny_source, tmp_path):
    again = generate_toy_source(str(tmp_path), TINY)
    files = _all_files(tiny_source["image_root"])
    assert files == _all_files(again["image_root"])
    assert len(files) == len(SOURCE_CLASSES) * 3 + 2  # 2 train + 1 val images per class, 2 indexes
    _, mismatch, errors = filecmp.cmpfiles(tiny_source["image_root"], again["image_root"], files, shallow=False)
    assert mismatch == [] and errors == []
    # another seed draws other images
    assert toy_source_layout(TINY, "train")[:5] != toy_source_layout(ToySourceSpec(seed=1), "train")[:5]


def test_classes_are_disjoint_from_the_toy_detection_classes():
    assert len(SOURCE_CLASSES) == len(set(SOURCE_CLASSES)) == 50
    assert not set(SOURCE_CLASSES) & set(TOY_CLASSES)
    # disjoint in what is drawn, not only in name: no toy shape comes back with another pattern
    assert not set(SOURCE_SHAPES) & {name.split("_")[1] for name in TOY_CLASSES}
    assert {name.split("_")[1] for name in SOURCE_CLASSES} == set(SOURCE_SHAPES)


def test_registered_dicts_are_balanced_and_match_the_files(tiny_source):
    assert MetadataCatalog.get("toy_source_tiny_train").thing_classes == list(SOURCE_CLASSES)
    for name, per_class in (("toy_source_tiny_train", 2), ("toy_source_tiny_val", 1)):
        dicts = DatasetCatalog.get(name)
        assert collections.Counter(d["label"] for d in dicts) == {c: per_class for c in range(len(SOURCE_CLASSES))}
        assert len({d["image_id"] for d in dicts}) == len(dicts)
        for d in dicts[:20]:
            assert set(d) == {"file_name", "image_id", "height", "width", "label"}
            # ImageFolder layout: the folder names the class
            assert os.path.basename(os.path.dirname(d["file_name"])) == SOURCE_CLASSES[d["label"]]
            with Image.open(d["file_name"]) as img:
                assert img.size == (d["width"], d["height"])
                assert TINY.min_image_size <= min(img.size) <= max(img.size) <= TINY.max_image_size
    check_dataset_files(["toy_source_train", "toy_source_val"])  # generated on use: not checked


def test_objects_are_drawn_over_the_background():
    """Every object changes the pixels it covers (a pattern that paints nothing would not)."""
    from drcl2.data.generated import toy_source

    for layout in toy_source_layout(TINY, "val")[:25]:
        # the image's generator draws the background first, so the same seed gives the same one
        rng = np.random.default_rng([TINY.seed, 1, layout["id"]])
        background = np.asarray(toy_source._render_background(rng, layout["width"], layout["height"], 1.0))
        image = np.asarray(toy_source._render_image(TINY, "val", layout))
        changed = (image != background).any(axis=2)
        for obj in layout["objects"]:
            x, y, r = int(obj["center"][0]), int(obj["center"][1]), int(obj["radius"])
            assert changed[max(0, y - r): y + r, max(0, x - r): x + r].sum() >= 10, (layout["id"], obj)


def test_ensure_refuses_another_spec_and_partial_folders(tiny_source, tmp_path):
    root = os.path.dirname(tiny_source["image_root"])
    assert ensure_toy_source(root, TINY) == tiny_source  # reused as it is
    with pytest.raises(ValueError, match="generated with"):
        ensure_toy_source(root, ToySourceSpec(num_train_per_class=3, num_val_per_class=1))
    os.makedirs(tmp_path / "toy_source")
    with pytest.raises(FileExistsError, match="no complete toy source set"):
        ensure_toy_source(str(tmp_path), TINY)


# ---------------------------------------------------------------------------------------------------
# Source pre-training
# ---------------------------------------------------------------------------------------------------
TINY_SETTINGS = SourcePretrainSettings(
    iters=2,
    batch_size=4,
    warmup_iters=1,
    input_size=64,
    num_workers=0,
    train_dataset="toy_source_tiny_train",
    val_dataset="toy_source_tiny_val",
)


@pytest.fixture(scope="module")
def source_weights(tiny_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("source_weights") / "r18.pth"
    result = ensure_source_weights(str(out), TOY_CONFIG, settings=TINY_SETTINGS, progress=False)
    assert not result["reused"] and 0.0 <= result["val_top1"] <= 100.0
    return out, torch.load(out, map_location="cpu", weights_only=False)


def _load_and_check(model, checkpointer_cls, path, saved, caplog):
    """Load ``path`` into ``model``; return the model keys the file left untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        checkpointer_cls(model).load(str(path), checkpointables=[])
    assert "shape" not in caplog.text.lower() and "unexpected" not in caplog.text.lower(), caplog.text
    state = model.state_dict()
    bottom_up = {k for k in state if k.startswith(PREFIX)}
    assert set(saved) == bottom_up  # every backbone.bottom_up.* key, nothing else
    for k in bottom_up:
        assert torch.equal(state[k], saved[k]), k
    # the file's weights replaced the fresh ones (and nothing outside bottom_up moved)
    assert any(not torch.equal(before[k], state[k]) for k in bottom_up if k.endswith("conv1.weight"))
    assert all(torch.equal(before[k], state[k]) for k in state if k not in bottom_up)
    return set(state) - bottom_up


def test_source_weights_load_into_toy_mask_rcnn(source_weights, caplog):
    path, checkpoint = source_weights
    saved = checkpoint["model"]
    assert checkpoint["__author__"] == source_pretrain.AUTHOR
    assert all(v.is_contiguous() for v in saved.values())  # trained NHWC, stored NCHW
    detector = Trainer.build_model(cfg_from("configs/toy/mask_rcnn_finetune.yaml"))
    fresh = _load_and_check(detector, DetectionCheckpointer, path, saved, caplog)
    assert fresh and all(k.startswith(("backbone.fpn_", "proposal_generator.", "roi_heads.")) for k in fresh), fresh


def test_source_weights_load_into_toy_drcl2(source_weights, caplog):
    path, checkpoint = source_weights
    saved = checkpoint["model"]
    model = Trainer.build_model(cfg_from("configs/toy/pretrain_2drcl.yaml"))
    assert isinstance(model, DRCL2)
    _load_and_check(model, DRCL2Checkpointer, path, saved, caplog)
    # the first training step copies the loaded online network into the target network
    assert not bool(model.target_initialized)
    model.reset_target()
    target = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(target["target_network." + k], v), k


def test_exported_weights_are_the_trained_ones(source_weights):
    """The file holds the trunk after training: not its seeded initialisation."""
    from detectron2.utils.env import seed_all_rng

    _, checkpoint = source_weights

    def initial_weights():
        seed_all_rng(TINY_SETTINGS.seed)  # what train_source_classifier does before building the model
        cfg = source_pretrain.build_source_config(TOY_CONFIG)
        return SourceClassifier(cfg, len(SOURCE_CLASSES)).detector_state_dict()

    initial = initial_weights()
    assert set(initial) == set(checkpoint["model"])
    convs = [k for k in initial if k.endswith("conv1.weight")]
    assert convs and all(torch.equal(initial[k], v) for k, v in initial_weights().items())  # seeded
    assert all(not torch.equal(initial[k], checkpoint["model"][k]) for k in convs)
    info = checkpoint["drcl2_source_pretrain"]
    assert info["recipe"]["iters"] == 2 and info["num_classes"] == len(SOURCE_CLASSES)


def test_cached_unless_forced_and_refused_for_another_recipe(source_weights, capsys):
    path, checkpoint = source_weights
    mtime = os.path.getmtime(path)
    again = ensure_source_weights(str(path), TOY_CONFIG, settings=TINY_SETTINGS, progress=False)
    assert again["reused"] and again["val_top1"] == checkpoint["drcl2_source_pretrain"]["val_top1"]
    # the same backbone through another config file is the same recipe
    other_file = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
    assert ensure_source_weights(str(path), other_file, settings=TINY_SETTINGS, progress=False)["reused"]
    assert os.path.getmtime(path) == mtime
    with pytest.raises(ValueError, match="seed: 0 there, 1 asked"):
        ensure_source_weights(str(path), TOY_CONFIG, seed=1, settings=TINY_SETTINGS, progress=False)
    with pytest.raises(ValueError, match="backbone"):  # another ResNet depth
        ensure_source_weights(str(path), TOY_CONFIG, settings=TINY_SETTINGS, opts=["MODEL.RESNETS.DEPTH", 34])
    # the command line: reuse is printed; errors name the flag
    argv = ["--config-file", TOY_CONFIG, "--output", str(path), "--iters", "2", "--batch-size", "4",
            "--warmup-iters", "1", "--input-size", "64", "--num-workers", "0",
            "--train-dataset", "toy_source_tiny_train", "--val-dataset", "toy_source_tiny_val"]
    assert source_pretrain.main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert source_pretrain.main(argv[:2] + ["--output", str(path) + ".x", "--train-dataset", "nope"]) == 1
    assert "--train-dataset 'nope' is not a registered dataset" in capsys.readouterr().err
    assert source_pretrain.main(["--config-file", "missing.yaml", "--output", str(path)]) == 1
    assert "--config-file 'missing.yaml' does not exist" in capsys.readouterr().err
    assert not os.path.exists(str(path) + ".x")


def test_frozen_bn_backbone_exports_the_detector_keys():
    """An R-50 FrozenBN config (the LVIS ones) trains BN and exports FrozenBN's keys."""
    cfg = cfg_from("configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
    classifier = SourceClassifier(cfg, num_classes=3)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in classifier.trunk.modules())
    assert all(p.requires_grad for p in classifier.trunk.parameters())  # FREEZE_AT 0
    exported = classifier.detector_state_dict()
    detector = Trainer.build_model(cfg)
    assert set(exported) == {k for k in detector.state_dict() if k.startswith(PREFIX)}
