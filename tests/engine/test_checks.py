"""What drcl2's Trainer refuses or reports at start and on failure: class counts, schedule keys,
drcl2's log lines, NaN."""

import logging
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from helpers import REPO_ROOT, cfg_from

import train_net
from drcl2.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "toy_lvis_root")

TINY = [
    "SOLVER.IMS_PER_BATCH", 2,
    "DATALOADER.NUM_WORKERS", 0,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", (),
    "SEED", 3,
]  # fmt: skip


def test_num_classes_other_than_the_datasets_is_refused(tmp_path):
    cfg = cfg_from(
        "configs/toy/mask_rcnn_finetune.yaml",
        *TINY,
        "OUTPUT_DIR",
        str(tmp_path),
        "MODEL.ROI_HEADS.NUM_CLASSES",
        31,
    )
    with pytest.raises(
        ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES = 31.*'lvis_v1_toy_train' has 30 classes"
    ):
        Trainer(cfg)


def test_a_bad_schedule_mode_names_the_key(tmp_path):
    cfg = cfg_from(
        "configs/toy/pretrain_2drcl.yaml",
        *TINY,
        "OUTPUT_DIR",
        str(tmp_path),
        "DATALOADER.DRCL2.MODE",
        "cosin",
    )
    with pytest.raises(ValueError, match=r"DATALOADER.DRCL2.MODE = 'cosin'.*unknown mode"):
        Trainer(cfg)


def test_drcl2_log_lines_reach_log_txt(tmp_path):
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml"),
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    train_net.setup(args)
    logging.getLogger("drcl2.data.samplers").info("a line from drcl2's sampler")
    log_txt = str(tmp_path / "log.txt")
    for handler in logging.getLogger(
        "drcl2"
    ).handlers:  # (console handlers of earlier tests are stale)
        if getattr(getattr(handler, "stream", None), "name", None) == log_txt:
            handler.flush()
    assert "a line from drcl2's sampler" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_a_nan_loss_stops_pretraining_and_the_last_checkpoint_resumes(tmp_path):
    cfg = cfg_from(
        "configs/toy/pretrain_2drcl.yaml",
        *TINY,
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        6,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer._trainer.model
    forward = model.forward

    def nan_at_iteration_3(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 3:
            losses["loss_hcl"] = losses["loss_hcl"] * float("nan")
        return losses

    model.forward = nan_at_iteration_3
    with pytest.raises(FloatingPointError, match="iteration=3"):
        trainer.train()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert resumed.iter == 6 and (tmp_path / "model_final_finetune.pth").exists()


# ------------------------------------------------------------------------------------------------
# a user's first day: own data from the command line, checks before anything is written
# ------------------------------------------------------------------------------------------------
def _args(*argv):
    return train_net.argument_parser().parse_args([str(a) for a in argv])


@pytest.fixture
def own_data(own_lvis_json):
    """The user's set registered with train_net.py --dataset (names removed afterwards)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"own_train_{os.getpid()}"
    yield name, own_lvis_json
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_dataset_flag_registers_an_lvis_json_before_the_config_is_read(tmp_path, own_data):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name, (json_file, image_root) = own_data
    args = _args(
        "--dataset", name, json_file, image_root,
        "--config-file", f"{REPO_ROOT}/configs/toy/mask_rcnn_finetune.yaml",
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", 5, "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    cfg = train_net.setup(args)
    assert cfg.DATASETS.TRAIN == (name,)
    assert MetadataCatalog.get(name).thing_classes == [f"thing{c}" for c in (1, 2, 4, 7, 9)]
    assert len(DatasetCatalog.get(name)) == 12


def test_an_unregistered_dataset_gets_detectron2s_message_naming_the_key(tmp_path):
    from drcl2.engine import check_config

    cfg = cfg_from("configs/toy/mask_rcnn_finetune.yaml", "DATASETS.TEST", ("my_val",))
    message = (
        r"DATASETS.TEST: dataset 'my_val' is not registered! Available datasets are: "
        r".*lvis_v1_toy_train.*--dataset NAME JSON"
    )
    with pytest.raises(KeyError, match=message):
        check_config(cfg)
    check_config(cfg_from("configs/toy/mask_rcnn_finetune.yaml"))  # the shipped sets are fine


def test_class_counts_of_test_and_health_sets_are_refused_before_anything_is_generated(
    tmp_path, own_data, monkeypatch
):
    """The toy pre-training config on a user's 5-class set: its health probe reads the toy val
    set (30 classes). Refused by name at start; no toy set generated, nothing written."""
    import drcl2.data.generated.toy_lvis

    def no_generation(*a, **k):
        raise AssertionError("a generated set was made")

    monkeypatch.setattr(drcl2.data.generated.toy_lvis, "ensure_toy_lvis", no_generation)
    name, (json_file, image_root) = own_data
    out = tmp_path / "run"
    argv = [
        "--dataset", name, json_file, image_root,
        "--config-file", f"{REPO_ROOT}/configs/toy/pretrain_2drcl.yaml",
        "DATASETS.TRAIN", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", 5, "OUTPUT_DIR", out,
    ]  # fmt: skip
    message = (
        r"MODEL.ROI_HEADS.NUM_CLASSES = 5, but TEST.HEALTH.DATASET 'lvis_v1_toy_val' has 30 "
        r"classes.*TEST.HEALTH.PERIOD 0"
    )
    with pytest.raises(ValueError, match=message):
        train_net.main(_args(*argv))
    assert not out.exists()  # nothing written, not even log.txt
    # a test set of other classes likewise
    argv += ["TEST.HEALTH.PERIOD", 0, "DATASETS.TEST", "('lvis_v1_toy_val',)"]
    with pytest.raises(ValueError, match=r"DATASETS.TEST 'lvis_v1_toy_val' has 30 classes"):
        train_net.main(_args(*argv))


def test_a_refused_start_leaves_the_runs_config_yaml_as_it_was(tmp_path, own_data):
    """A finished run's folder, started again with --resume and a mistake: refused, config.yaml
    unchanged; refused later by the dataset check (a missing image): unchanged too."""
    import json
    import shutil

    name, (json_file, image_root) = own_data
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the finished run's config\n")
    base = [
        "--config-file", f"{REPO_ROOT}/configs/toy/mask_rcnn_finetune.yaml", "--resume",
        "MODEL.DEVICE",
        "cpu",
        "DATASETS.TEST", "()", "OUTPUT_DIR", out, *TINY[:4],
    ]  # fmt: skip
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES = 5"):
        train_net.main(_args(*base, "MODEL.ROI_HEADS.NUM_CLASSES", 5))
    assert (out / "config.yaml").read_text() == "the finished run's config\n"
    # the user's set with a missing image: the Trainer's dataset check refuses it
    images = tmp_path / "images"
    shutil.copytree(image_root, images)
    first = json.load(open(json_file))["images"][0]["file_name"]
    os.remove(images / first)
    from drcl2.data.dataset_check import DatasetCheckError

    with pytest.raises(DatasetCheckError, match="missing image files: 1 image"):
        train_net.main(
            _args("--dataset", name, json_file, images, *base, "DATASETS.TRAIN", f"('{name}',)",
                  "MODEL.ROI_HEADS.NUM_CLASSES", 5)
        )  # fmt: skip
    assert (out / "config.yaml").read_text() == "the finished run's config\n"


def test_resume_without_a_checkpoint_warns_naming_the_folder(tmp_path, drcl2_log):
    cfg = cfg_from("configs/toy/mask_rcnn_finetune.yaml", *TINY, "OUTPUT_DIR", str(tmp_path))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    warnings = [r.getMessage() for r in drcl2_log.records if r.levelno == logging.WARNING]
    assert any(f"--resume: no checkpoint in '{tmp_path}'" in m for m in warnings), warnings
    drcl2_log.clear()
    Trainer(cfg).resume_or_load(resume=False)  # not asked to resume: nothing to say
    assert not [r for r in drcl2_log.records if "--resume" in r.getMessage()]


def test_a_divergence_inside_the_model_names_the_iteration(tmp_path):
    """detectron2's RPN raises FloatingPointError without the iteration; the Trainer adds it."""
    cfg = cfg_from(
        "configs/toy/mask_rcnn_finetune.yaml", *TINY, "OUTPUT_DIR", str(tmp_path),
        "SOLVER.MAX_ITER", 4,
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer._trainer.model
    forward = model.forward

    def diverge_at_2(batched_inputs):
        if trainer.iter == 2:
            raise FloatingPointError(
                "Predicted boxes or scores contain Inf/NaN. Training has diverged."
            )
        return forward(batched_inputs)

    model.forward = diverge_at_2
    with pytest.raises(FloatingPointError, match=r"^iteration 2: Predicted boxes or scores"):
        trainer.train()
