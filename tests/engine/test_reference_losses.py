"""
The default toy pre-training and fine-tuning, a few iterations on the CPU, against committed losses:
every loss of every iteration equal to the last bit. It pins the method's behaviour across
refactoring (a change that moves a loss is a behaviour change, and says so here first).

    DRCL2_WRITE_REFERENCE=1 pytest tests/engine/test_reference_losses.py   # rewrite the reference,
                                                                           on
                                                                    purpose
"""

import json
import os

import pytest
from helpers import REPO_ROOT, cfg_from

REFERENCE = os.path.join(REPO_ROOT, "tests", "reference", "toy_losses.json")
ITERS = 3


def _losses(trainer):
    """{loss name: [value of iteration 0, 1, ...]} from the run's EventStorage."""
    return {
        name: [value for value, _ in history.values()]
        for name, history in sorted(trainer.storage.histories().items())
        if name.startswith("loss_") or name == "total_loss"
    }


def _train(config, output_dir, *opts):
    from drcl2.engine import Trainer

    cfg = cfg_from(
        config,
        "OUTPUT_DIR", str(output_dir),
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", str(ITERS),
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "DATASETS.TEST", "()",
        *opts,
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return _losses(trainer)


@pytest.mark.slow
def test_default_toy_pretraining_and_finetuning_losses_are_unchanged(
    tmp_path, toy_lvis_root, one_thread
):
    import torch

    if str(os.environ.get("DRCL2_TEST_DEVICE", "cpu")) != "cpu":
        pytest.skip("the reference losses are CPU float32 values")
    torch.manual_seed(0)
    pretrain = _train("configs/toy/pretrain_2drcl.yaml", tmp_path / "pretrain")
    export = tmp_path / "pretrain" / "model_final_finetune.pth"
    finetune = _train(
        "configs/toy/mask_rcnn_finetune.yaml", tmp_path / "finetune", "MODEL.WEIGHTS", str(export)
    )
    got = {"pretrain": pretrain, "finetune": finetune}
    if os.environ.get("DRCL2_WRITE_REFERENCE"):
        with open(REFERENCE, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    with open(REFERENCE) as f:
        expected = json.load(f)
    for stage in ("pretrain", "finetune"):
        assert sorted(got[stage]) == sorted(expected[stage]), stage  # the same losses ...
        for name, values in expected[stage].items():
            assert got[stage][name] == values, (
                f"{stage} {name}: {got[stage][name]} != reference {values}"
            )  # ... bit for bit
    assert {"loss_hcl", "loss_lcl_inst", "loss_lcl_sup", "loss_ar", "loss_sr", "loss_cls"} <= set(
        pretrain
    )
    assert all(len(v) == ITERS for v in pretrain.values())
