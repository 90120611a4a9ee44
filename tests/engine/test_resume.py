"""
Exact resume: a run interrupted after a checkpoint and resumed with --resume gives the batches and
losses of the uninterrupted run (pre-training with the dynamic sampler, fine-tuning with
detectron2's RepeatFactorTrainingSampler; aspect-ratio grouping on; DataLoader workers 0 and 2).
"""

import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from helpers import REPO_ROOT, cfg_from

from drcl2.data.resumable_loader import ResumableTrainLoader
from drcl2.engine import Trainer
from drcl2.tools.check_resume import losses_of_run
from drcl2.utils.seeding import derived_seed, seeded_random_state

pytestmark = pytest.mark.usefixtures("one_thread", "toy_lvis_root")

MAX_ITER, CHECKPOINT_AT = 8, 4


class _RecordingTrainer(Trainer):
    """Records the image ids of every batch its data loaders hand out (in ``seen``)."""

    seen = []

    @classmethod
    def build_train_loader(cls, cfg, *args, **kwargs):
        return _RecordingLoader(super().build_train_loader(cfg, *args, **kwargs), cls.seen)


class _RecordingLoader:
    def __init__(self, loader, seen):
        self.loader, self.seen = loader, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.append([d["image_id"] for d in batch])
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def _cfg(kind, output_dir, workers):
    common = [
        "OUTPUT_DIR", str(output_dir),
        "SOLVER.MAX_ITER", MAX_ITER,
        "SOLVER.CHECKPOINT_PERIOD", CHECKPOINT_AT,
        "SOLVER.IMS_PER_BATCH", 2,
        "DATALOADER.NUM_WORKERS", workers,
        "DATALOADER.ASPECT_RATIO_GROUPING", True,
        "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 96,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "SOLVER.WARMUP_ITERS", 2,
        "SOLVER.STEPS", (6,),
        "TEST.EVAL_PERIOD", 0,
        "DATASETS.TEST", (),
        "SEED", 7,
    ]  # fmt: skip
    if kind == "pretrain":
        return cfg_from("configs/toy/pretrain_2drcl.yaml", *common)
    return cfg_from(
        "configs/toy/mask_rcnn_finetune.yaml", *common, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64
    )


def _train(cfg, resume, stop_after=None):
    _RecordingTrainer.seen = []
    trainer, losses = losses_of_run(cfg, resume, stop_after, trainer_class=_RecordingTrainer)
    return trainer, losses, _RecordingTrainer.seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,workers", [("pretrain", 0), ("pretrain", 2), ("finetune", 0), ("finetune", 2)]
)
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, kind, workers):
    full, full_losses, full_seen = _train(_cfg(kind, tmp_path / "full", workers), resume=False)
    assert sorted(full_losses) == list(range(MAX_ITER))

    cut_cfg = _cfg(kind, tmp_path / "cut", workers)
    cut, cut_losses, _ = _train(cut_cfg, resume=False, stop_after=CHECKPOINT_AT - 1)
    assert cut.iter == CHECKPOINT_AT - 1
    assert cut_losses == {it: full_losses[it] for it in range(CHECKPOINT_AT)}
    assert (
        tmp_path / "cut" / "last_checkpoint"
    ).read_text() == f"model_{CHECKPOINT_AT - 1:07d}.pth"
    resumed, resumed_losses, resumed_seen = _train(cut_cfg, resume=True)
    assert resumed.start_iter == CHECKPOINT_AT
    assert sorted(resumed_losses) == list(range(CHECKPOINT_AT, MAX_ITER))

    # same batches (aspect-ratio buckets included) ...
    assert resumed_seen == full_seen[CHECKPOINT_AT:]
    # ... and the same losses, term by term, to floating-point noise
    for it in range(CHECKPOINT_AT, MAX_ITER):
        a, b = full_losses[it], resumed_losses[it]
        assert a.keys() == b.keys() and len(a) >= 3, it
        differ = {
            name: (a[name], b[name])
            for name in a
            if b[name] != pytest.approx(a[name], rel=1e-5, abs=1e-7)
        }
        assert not differ, (it, differ)


def test_views_do_not_depend_on_the_number_of_workers(tmp_path):
    """The image at stream position p is augmented from (seed, rank, p) alone."""

    def first_batches(workers):
        cfg = _cfg("pretrain", tmp_path, workers)
        loader = Trainer.build_train_loader(cfg, seed=11)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == 3:
                return batches, loader.state_dict()

    (a, state_a), (b, state_b) = first_batches(0), first_batches(2)
    assert state_a == state_b
    for batch_a, batch_b in zip(a, b):
        for x, y in zip(batch_a, batch_b):
            assert x["image_id"] == y["image_id"]
            assert torch.equal(x["view1"]["image"], y["view1"]["image"])
            assert torch.equal(
                x["view2"]["instances"].gt_boxes.tensor, y["view2"]["instances"].gt_boxes.tensor
            )


def _loader(records, mapper, state=None, grouping=True, workers=0):
    return ResumableTrainLoader(
        records,
        _Cycle(len(records)),
        mapper,
        batch_size=2,
        aspect_ratio_grouping=grouping,
        num_workers=workers,
        seed=5,
        state=state,
    )


class _Cycle:
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        i = 0
        while True:
            yield i % self.n
            i += 1


def _draw(d):
    return dict(d, draw=float(np.random.rand()), tdraw=float(torch.rand(())))


def test_loader_state_resumes_the_buckets():
    # orientations: landscape images wait in their bucket while portrait ones fill batches
    records = [{"image_id": i, "width": 10 if i % 3 else 5, "height": 8} for i in range(9)]
    loader = _loader(records, _draw)
    it = iter(loader)
    first = [next(it)]
    state = loader.state_dict()
    assert state["buckets"] == [
        [],
        [[0, 0]],
        [],
        [],
    ]  # image 0 (portrait) waits for a second portrait one
    rest = [next(it) for _ in range(4)]
    resumed = iter(_loader(records, _draw, state=state))
    assert [next(resumed) for _ in range(4)] == rest
    for batch in first + rest:  # detectron2's rule: one orientation per batch
        assert len({d["width"] > d["height"] for d in batch}) == 1
    # without the buckets' state (a restart at the next position) the batches differ
    restarted = iter(
        _loader(
            records,
            _draw,
            state={"next_position": state["next_position"], "buckets": [[], [], [], []]},
        )
    )
    assert [next(restarted) for _ in range(4)] != rest


def _two_views(d):
    """Two views cropped each on its own: orientations drawn per view, whatever the original's."""

    def view():
        h, w = (8, 12) if np.random.rand() < 0.5 else (12, 8)
        return {"image": torch.zeros(3, h, w, dtype=torch.uint8)}

    return dict(d, view1=view(), view2=view())


def test_two_views_are_grouped_by_their_own_orientation():
    # every original is landscape; the views are not: batches group the views' orientations
    records = [{"image_id": i, "width": 10, "height": 8} for i in range(40)]
    loader = _loader(records, _two_views)
    it = iter(loader)
    batches = [next(it) for _ in range(12)]
    kinds = [
        {
            tuple(d[v]["image"].shape[-1] > d[v]["image"].shape[-2] for v in ("view1", "view2"))
            for d in b
        }
        for b in batches
    ]
    for batch_kinds in kinds:  # one (view 1, view 2) orientation pair per batch
        assert len(batch_kinds) == 1
    assert len(set().union(*kinds)) == 4  # the generated set has all four pairs
    # exact resume: a loader built from the state gives the same batches
    state = loader.state_dict()
    rest = [next(it) for _ in range(4)]
    resumed = iter(_loader(records, _two_views, state=state))
    assert [[d["image_id"] for d in b] for b in (next(resumed) for _ in range(4))] == [
        [d["image_id"] for d in b] for b in rest
    ]


def test_grouping_by_the_views_pads_less_than_by_the_original(benchmarks):
    """The padding benchmark's figures (no timing): grouping by the views pads less than by the
    original, with view 1 the whole image (the default) and with both views cropped (2DRCL v1's
    views)."""
    from drcl2.config import add_drcl2_config

    bench = benchmarks("bench_padding")
    for opts in ([], ["INPUT.DRCL2.CROP_PROB", "(1.0, 1.0)"]):
        cfg = get_cfg()
        add_drcl2_config(cfg)
        cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/pretrain_2drcl.yaml"))
        cfg.merge_from_list(opts)
        row = bench.padding_table(cfg, num_images=1000, batch_sizes=[4])[4]
        assert row["views"] < row["original"] - 2 and row["views"] < row["none"] - 2, (opts, row)


def test_mapping_keeps_the_callers_random_state():
    np.random.seed(0)
    torch.manual_seed(0)
    expected = (np.random.rand(), float(torch.rand(())))
    np.random.seed(0)
    torch.manual_seed(0)
    with seeded_random_state(derived_seed(1, 2, 3)):
        np.random.rand(5)
        torch.rand(5)
    assert (np.random.rand(), float(torch.rand(()))) == expected


def test_mapping_keeps_the_callers_cuda_random_state(monkeypatch):
    """CPU half: where CUDA is initialised, the CUDA generators' states are saved before the image's
    seed and given back after it (faked here: the calls are recorded)."""
    calls = []
    cuda_states = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "device_count", lambda: 0
    )  # manual_seed's CUDA part seeds nothing
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("get") or cuda_states)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: calls.append(("set", states))
    )
    with seeded_random_state(derived_seed(1, 2, 3)):
        assert calls == ["get"]
    assert calls == ["get", ("set", cuda_states)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mapping_keeps_the_callers_cuda_random_state_on_gpu():
    """GPU half: the CUDA stream after a seeded mapping is the one without it (the step's
    sampling)."""
    torch.manual_seed(0)
    expected = torch.rand(4, device="cuda")
    torch.manual_seed(0)
    with seeded_random_state(derived_seed(1, 2, 3)):
        torch.rand(5, device="cuda")
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_a_truncated_image_names_its_file(tmp_path):
    from PIL import Image

    from drcl2.data.two_view_mapper import TwoViewDatasetMapper

    path = tmp_path / "img_17.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (96, 128, 3), dtype=np.uint8)).save(
        path, quality=95
    )
    path.write_bytes(path.read_bytes()[:2000])  # cut short, as by an interrupted copy
    records = [
        {"file_name": str(path), "image_id": 17, "width": 128, "height": 96, "annotations": []}
    ]
    mapper = TwoViewDatasetMapper(_cfg("pretrain", tmp_path, 0), is_train=True)
    with pytest.raises(OSError, match=r"image file is truncated.*img_17\.jpg \(image_id 17\)"):
        next(iter(_loader(records, mapper)))


def test_state_of_another_grouping_is_refused():
    with pytest.raises(ValueError, match="ASPECT_RATIO_GROUPING"):
        _loader(
            [{"image_id": 0}], _draw, state={"next_position": 3, "buckets": [[]]}, grouping=True
        )


@pytest.mark.slow
def test_check_resume_command_reports_zero_differences(tmp_path, capsys):
    from drcl2.tools.check_resume import main

    worst = main(
        [
            "--config-file", os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml"),
            "--iters", "3",
            "--checkpoint-at", "2",
            "--output", str(tmp_path),
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",
            "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "96",
            "DATALOADER.NUM_WORKERS", "0",
        ]
    )  # fmt: skip
    assert set(worst) >= {"loss_cls", "loss_box_reg", "loss_mask"} and max(worst.values()) < 1e-5
    assert "loss_mask" in capsys.readouterr().out


@pytest.mark.slow
def test_a_drawn_seed_is_kept_by_the_checkpoint(tmp_path):
    """SEED -1: the seed drawn at start is saved, and the resumed run takes it (and rebuilds its
    loader with it)."""
    cfg = _cfg("finetune", tmp_path, 0)
    cfg.merge_from_list(["SEED", -1, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1])
    cut, _, _ = _train(cfg, resume=False, stop_after=0)
    resumed = Trainer(cfg)
    drawn_again = resumed.seed
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1 and resumed.seed == cut.seed != drawn_again
    assert resumed._trainer.data_loader.seed == cut.seed
