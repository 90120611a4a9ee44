"""Fine-tuning and evaluation through drcl2's Trainer and train_net.py on the toy LVIS set."""

import json
import math
import os

import pytest
import torch
from detectron2.engine import default_argument_parser, launch
from helpers import REPO_ROOT

import train_net
from drcl2 import Trainer
from drcl2.tools.summarize import main as summarize
from drcl2.tools.summarize import read_eval_metrics

TOY_CONFIG = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
# the toy config made smaller still: 64-96 px inputs, few proposals and detections
TINY = [
    "MODEL.DEVICE", "cpu",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "TEST.DETECTIONS_PER_IMAGE", "10",
]  # fmt: skip


def _args(output_dir, *extra, flags=()):
    return default_argument_parser().parse_args(
        ["--config-file", TOY_CONFIG, *flags, *TINY, "OUTPUT_DIR", str(output_dir), *extra]
    )


@pytest.mark.slow
def test_finetune_evaluate_then_resume(toy_val_mini, tmp_path, capsys):
    train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", f"('{toy_val_mini}',)"))
    results = read_eval_metrics(str(tmp_path))  # what the EvalHook logged at the end of training
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert math.isfinite(results[task][key]) and results[task][key] >= 0, (task, key)
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "lvis_instances_results.json").is_file()
    summarize([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "APr" in printed and "segm" in printed and "model_final.pth" in printed

    # --resume: a longer schedule goes on from the last checkpoint (iteration 1 -> starts at 2)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert saved["iteration"] == 1
    cfg = train_net.setup(
        _args(tmp_path, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()", flags=["--resume"])
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    assert trainer.optimizer.state_dict()["state"]  # momentum buffers came back too
    trainer.train()
    assert trainer.iter == 4
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 3
    assert (tmp_path / "model_0000000.pth").is_file()  # what was written before is kept


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend, so CPU processes cannot form a process group",
)
def test_two_cpu_processes_through_launch(toy_lvis_root, tmp_path):
    args = _args(tmp_path, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", flags=["--num-gpus", "2"])
    launch(train_net.main, args.num_gpus, dist_url="auto", args=(args,))
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert checkpoint["iteration"] == 1
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 1
