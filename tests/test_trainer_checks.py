"""What drcl2's Trainer refuses or reports at start and on failure: class counts, schedule keys,
drcl2's log lines, NaN."""

import logging
import os

import pytest
import torch
from conftest import REPO_ROOT, cfg_from
from detectron2.engine import default_argument_parser

import train_net
from drcl2.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "toy_lvis_root")

TINY = [
    "SOLVER.IMS_PER_BATCH",
    2,
    "DATALOADER.NUM_WORKERS",
    0,
    "INPUT.MIN_SIZE_TRAIN",
    (64,),
    "INPUT.MAX_SIZE_TRAIN",
    96,
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    64,
    "TEST.EVAL_PERIOD",
    0,
    "DATASETS.TEST",
    (),
    "SEED",
    3,
]


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
