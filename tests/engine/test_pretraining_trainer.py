"""2DRCL pre-training on the toy LVIS set through drcl2's Trainer (export, resume) and detectron2's
DefaultTrainer."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import REPO_ROOT

from drcl2.checkpoint import DRCL2Checkpointer
from drcl2.config import add_drcl2_config
from drcl2.data.two_view_mapper import TwoViewDatasetMapper
from drcl2.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_cfg(output_dir, max_iter):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(output_dir),
            "SOLVER.MAX_ITER", max_iter,
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.CHECKPOINT_PERIOD", 2,
            "DATALOADER.NUM_WORKERS", 0,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
            "INPUT.MIN_SIZE_TRAIN", (64,),
            "INPUT.MAX_SIZE_TRAIN", 96,
        ]
    )  # fmt: skip
    return cfg


@pytest.mark.slow
def test_pretrain_export_and_resume(tmp_path, toy_lvis_root):
    assert isinstance(Trainer.build_train_mapper(toy_cfg(tmp_path, 2)), TwoViewDatasetMapper)
    trainer = Trainer(toy_cfg(tmp_path, 2))
    assert isinstance(trainer.checkpointer, DRCL2Checkpointer)
    model = trainer.model
    # the Trainer handed the training set's class statistics over (toy set, t = 0.1: some r > 1)
    assert bool(model.class_statistics_set) and float(model.class_repeat_factors.max()) > 1.0
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 1
    # The target moved by the EMA rule: equal to neither its start nor the online weights.
    name = "backbone.fpn_output2.weight"
    assert not torch.equal(saved["model"]["target_network." + name], saved["model"][name])
    assert os.path.exists(tmp_path / "model_final_finetune.pth")
    # ... and it loads into the toy fine-tuning Mask R-CNN: every exported key, same values.
    ft_cfg = get_cfg()
    add_drcl2_config(ft_cfg)
    ft_cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml"))
    ft_cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_BOX_HEAD.FC_DIM", 128])
    detector = build_model(ft_cfg)
    DetectionCheckpointer(detector).load(
        str(tmp_path / "model_final_finetune.pth"), checkpointables=[]
    )
    exported = torch.load(tmp_path / "model_final_finetune.pth", weights_only=False)["model"]
    detector_state = detector.state_dict()
    assert exported and all(torch.equal(detector_state[k], v) for k, v in exported.items())
    metrics = trainer.storage.latest()
    assert "drcl2/momentum" in metrics and "drb/lambda" in metrics

    # --resume with a longer schedule: iteration, target network, optimizer and statistics go on.
    resumed = Trainer(toy_cfg(tmp_path, 3))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    state = resumed.model.state_dict()
    for k, v in saved["model"].items():
        if k.startswith("target_network.") or k in (
            "class_repeat_factors",
            "target_initialized",
            "last_iteration",
            "target_update_pending",
        ):
            assert torch.equal(state[k], v), k
    opt = resumed.optimizer.state_dict()
    assert opt["state"] and len(opt["state"]) == len(
        saved["trainer"]["_trainer"]["optimizer"]["state"]
    )
    first = next(iter(saved["trainer"]["_trainer"]["optimizer"]["state"]))
    assert torch.equal(
        opt["state"][first]["momentum_buffer"],
        saved["trainer"]["_trainer"]["optimizer"]["state"][first]["momentum_buffer"],
    )
    before = state["target_network." + name].clone()
    resumed.train()
    assert resumed.iter == 3  # the loop ran iteration 2 only
    assert not torch.equal(resumed.model.state_dict()["target_network." + name], before)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2


@pytest.mark.slow
def test_detectron2_default_trainer_runs_a_correct_pretraining(
    tmp_path, toy_lvis_root, monkeypatch
):
    """
    Under detectron2's own DefaultTrainer (the user's lines: TwoViewDatasetMapper and the dynamic
    sampler in the loader, the same rebalancing schedule and the class statistics handed to the
    model; no drcl2 hook), the target network changes at every step and the class weights of
    instance selection follow lambda. Catches: a target update or DRB schedule that only drcl2's
    Trainer drives.
    """
    from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.engine import DefaultTrainer, HookBase

    from drcl2.data.rebalance import build_rebalance_schedule
    from drcl2.data.samplers import DynamicRepeatFactorTrainingSampler
    from drcl2.modeling import draws

    cfg = toy_cfg(tmp_path, 4)
    cfg.DATALOADER.DRCL2.CHUNK_ITERS = 1  # lambda moves at every one of the 4 iterations
    schedule = build_rebalance_schedule(cfg)  # one schedule, for the sampler and the model

    class PlainTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
            return build_detection_train_loader(
                cfg,
                dataset=dicts,
                mapper=TwoViewDatasetMapper(cfg, is_train=True),
                sampler=DynamicRepeatFactorTrainingSampler.from_config(
                    cfg, dicts, schedule=schedule
                ),
            )

    class Snapshot(HookBase):  # the target as each step's forward left it
        def after_step(self):
            targets.append(self.trainer.model.state_dict()["target_network." + NAME].clone())

    NAME = "backbone.fpn_output2.weight"
    targets, weights = [], []
    sample = draws.sample_instances
    monkeypatch.setattr(
        draws, "sample_instances", lambda c, w, k, g: weights.append(w) or sample(c, w, k, g)
    )
    trainer = PlainTrainer(cfg)
    trainer.model.rebalance_schedule = schedule
    trainer.model.set_class_statistics(get_detection_dataset_dicts(cfg.DATASETS.TRAIN))
    trainer.register_hooks([Snapshot()])
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert len(targets) == 4
    assert all(not torch.equal(a, b) for a, b in zip(targets, targets[1:]))
    r = trainer.model.class_repeat_factors
    assert r.max() > 1.0
    lambdas = [0.0, 0.25, 0.5, 0.75]  # SOLVER.MAX_ITER 4, DATALOADER.DRCL2 START 0, END 1, linear
    assert len(weights) == 4 * cfg.SOLVER.IMS_PER_BATCH  # one draw per image
    for i, w in enumerate(weights):
        assert torch.allclose(w, r ** lambdas[i // cfg.SOLVER.IMS_PER_BATCH])


@pytest.mark.slow
def test_the_sampler_the_model_and_the_log_use_one_lambda_per_iteration(
    tmp_path, toy_lvis_root, monkeypatch
):
    """
    DRB's two halves and its log agree at every iteration: the lambda of the model's class weights
    (instance draws, L_sup, masking) is the sampler's (chunks of CHUNK_ITERS) and the logged
    ``drb/lambda``. Catches: a model that takes lambda from the schedule without the sampler's
    chunks, or from a schedule of its own (two lambdas side by side).
    """
    cfg = toy_cfg(tmp_path, 6)
    cfg.DATALOADER.DRCL2.CHUNK_ITERS = 2
    trainer = Trainer(cfg)
    model = trainer.model
    used = {}
    term_weights_at = model.term_weights_at

    def recording(iteration):
        lam, weights = term_weights_at(iteration)
        used.setdefault(iteration, set()).add(lam)
        return lam, weights

    monkeypatch.setattr(model, "term_weights_at", recording)
    trainer.resume_or_load(resume=False)
    trainer.train()
    sampler = trainer._trainer.data_loader.sampler
    logged = {it: v for v, it in trainer.storage.history("drb/lambda").values()}
    assert model.rebalance_schedule is trainer.rebalance_schedule is sampler.schedule
    assert sorted(used) == sorted(logged) == list(range(6))
    for it in range(6):
        assert used[it] == {sampler.lam_at(it)} == {logged[it]}, it
    assert [logged[it] for it in range(6)] == [0.0, 0.0, 2 / 6, 2 / 6, 4 / 6, 4 / 6]
