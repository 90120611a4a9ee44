"""DynamicRepeatFactorTrainingSampler: parity with detectron2's RFS, statistics, shards, resume."""

import itertools
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data.common import ToIterableDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from drcl2.config import add_drcl2_config
from drcl2.data.rebalance import RebalanceSchedule, repeat_factors
from drcl2.data.samplers import DynamicRepeatFactorTrainingSampler


def long_tailed_dicts(num_images=600, num_classes=80, seed=0):
    """Generated long-tailed set: class c ~ c^-2 frequent; every 13th image has no annotations."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_classes + 1, dtype=np.float64) ** -2.0
    p /= p.sum()
    dicts = []
    for i in range(num_images):
        n = 0 if i % 13 == 0 else int(rng.integers(1, 10))
        dicts.append(
            {
                "image_id": i,
                "annotations": [{"category_id": int(c)} for c in rng.choice(num_classes, n, p=p)],
            }
        )
    return dicts


T = 0.02  # a threshold at which this small set has plenty of repeats at both levels


@pytest.fixture(scope="module")
def dicts():
    return long_tailed_dicts()


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def make(dicts, **kwargs):
    args = dict(
        repeat_thresh=T, schedule=RebalanceSchedule(0.0, 1.0), max_iter=100, ims_per_batch=8, seed=3
    )
    args.update(kwargs)
    return DynamicRepeatFactorTrainingSampler(dicts, **args)


def split_passes(stream):
    """Passes of an unshuffled stream: each pass lists indices in increasing order."""
    passes, current = [], []
    for i in stream:
        if current and i < current[-1]:
            passes.append(current)
            current = []
        current.append(i)
    return passes  # the last, possibly incomplete, pass is dropped


def test_lambda0_stream_equals_detectron2_rfs(dicts):
    rf = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, T)
    theirs = take(RepeatFactorTrainingSampler(rf, seed=11), 5000)
    ours = take(make(dicts, schedule=0.0, seed=11), 5000)
    assert ours == theirs  # several passes, index for index
    # also with a schedule that stays at λ = 0 for the stretch compared
    ours = take(make(dicts, schedule=RebalanceSchedule(0.99, 1.0), max_iter=10_000, seed=11), 5000)
    assert ours == theirs


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_mean_appearances_match_repeat_factors(dicts, lam):
    num_passes = 300
    expected = repeat_factors(dicts, repeat_thresh=T, lam=lam).double()
    sampler = make(dicts, schedule=lam, shuffle=False, seed=5)
    stream = take(sampler, int(expected.sum().item() * (num_passes + 2)))
    passes = split_passes(stream)[:num_passes]
    assert len(passes) == num_passes
    counts = torch.zeros(len(dicts), dtype=torch.float64)
    for p in passes:
        counts += torch.bincount(torch.tensor(p), minlength=len(dicts)).double()
    mean = counts / num_passes
    # Per pass an image appears floor(r) or floor(r) + 1 times (Bernoulli with p = frac(r)), so the
    # mean of n passes has standard deviation sqrt(p (1 - p) / n); allow 5 of them (+ float slack).
    frac = expected - expected.floor()
    tol = 5 * torch.sqrt(frac * (1 - frac) / num_passes) + 1e-6
    assert bool(((mean - expected).abs() <= tol).all()), (mean - expected).abs().max()
    # per pass, counts are always the floor or the ceiling
    one = torch.bincount(torch.tensor(passes[0]), minlength=len(dicts)).double()
    assert bool(((one == expected.floor()) | (one == expected.ceil())).all())
    # and the total over all passes is within 5 standard deviations of the expectation
    total_sd = math.sqrt(float((frac * (1 - frac)).sum()) * num_passes)
    assert abs(counts.sum().item() - expected.sum().item() * num_passes) <= 5 * total_sd + 1


def _image_factor_sets(dicts):
    return repeat_factors(dicts, T, 0.0).double(), repeat_factors(dicts, T, 1.0).double()


def test_lambda_moves_within_one_pass(dicts):
    """
    λ steps from 0 to 1 half-way through the FIRST pass: the second half of that pass must already
    follow the instance-level factors. (A sampler that takes λ once per pass keeps λ = 0 for the
    whole pass, and both halves have the same composition.)
    """
    r0, r1 = _image_factor_sets(dicts)
    pass_iters = int(r0.sum()) // 8  # iterations of 8 images in one pass at λ = 0
    gain = r1 / r0  # how much more often λ = 1 shows each image
    favoured, disfavoured = gain >= gain.quantile(0.9), gain <= gain.quantile(0.1)
    contrast = float(
        (r1[favoured].sum() / r1[disfavoured].sum()) / (r0[favoured].sum() / r0[disfavoured].sum())
    )
    assert contrast > 1.4  # the data has a real contrast between the two sets
    shares = {"first": [], "second": []}
    for seed in range(20):
        sampler = make(
            dicts,
            schedule=RebalanceSchedule(0.5, 0.5),
            max_iter=pass_iters,
            chunk_iters=5,
            seed=seed,
        )
        assert (
            sampler.lam_at(pass_iters // 2 - 5) == 0.0
            and sampler.lam_at(pass_iters // 2 + 5) == 1.0
        )
        stream = torch.tensor(take(sampler, pass_iters * 8))  # at most one pass at λ = 0
        for half, part in (
            ("first", stream[: len(stream) // 2 - 40]),
            ("second", stream[len(stream) // 2 + 40 :]),
        ):
            counts = torch.bincount(part, minlength=len(dicts)).double()
            shares[half].append(
                float(counts[favoured].sum() / counts[disfavoured].sum().clamp(min=1))
            )
    first, second = np.mean(shares["first"]), np.mean(shares["second"])
    expected_first = float(r0[favoured].sum() / r0[disfavoured].sum())
    assert first == pytest.approx(expected_first, rel=0.15)  # λ = 0 composition
    assert second > 1.3 * first, (first, second)  # the instance-level images gained after the step


def test_each_chunk_takes_lambda_at_its_start(dicts):
    s = make(dicts, schedule=RebalanceSchedule(0.0, 1.0), max_iter=200, chunk_iters=10)
    lams = [s.lam_at(i) for i in range(200)]
    assert len(set(lams)) == 20  # a 200-iteration schedule sees 20 values of λ
    for i in range(200):
        assert lams[i] == pytest.approx((i - i % 10) / 200)
    with pytest.raises(ValueError, match="chunk_iters"):
        make(dicts, chunk_iters=0)


def test_pass_counts_with_a_moving_lambda(dicts):
    """
    One pass while λ moves (re-drawn at every chunk): no image appears more often than its
    largest count over the pass's λs allows, and the pass holds about sum_I r_I(λ) images.
    """
    r0, r1 = _image_factor_sets(dicts)
    sampler = make(
        dicts,
        schedule=RebalanceSchedule(0.0, 1.0),
        max_iter=int(r1.sum()) // 8,
        chunk_iters=1,
        shuffle=False,
        seed=4,
    )
    n = int(r0.sum() * 0.5)
    counts = torch.bincount(torch.tensor(take(sampler, n)), minlength=len(dicts)).double()
    ceiling = torch.maximum(r0, r1).ceil()  # r_I(λ) lies between the two factor sets
    assert bool((counts <= ceiling).all())


def test_lam_at(dicts):
    s = make(dicts, schedule=RebalanceSchedule(0.2, 0.6, "linear"), max_iter=1000, chunk_iters=1)
    assert s.lam_at(0) == 0.0 and s.lam_at(200) == 0.0
    assert s.lam_at(400) == pytest.approx(0.5)
    assert s.lam_at(600) == 1.0 and s.lam_at(5000) == 1.0
    c = make(dicts, schedule=RebalanceSchedule(0.0, 1.0, "cosine"), max_iter=1000, chunk_iters=1)
    assert c.lam_at(500) == pytest.approx(0.5) and c.lam_at(250) < 0.25
    chunked = make(
        dicts, schedule=RebalanceSchedule(0.2, 0.6, "linear"), max_iter=1000, chunk_iters=50
    )
    assert chunked.lam_at(449) == pytest.approx(0.5) and chunked.lam_at(450) == pytest.approx(0.625)


@pytest.fixture
def world(monkeypatch):
    """Pretend to be rank `rank` of `size` (the sampler reads both at construction)."""

    def set_world(rank, size):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        monkeypatch.setattr(comm, "get_world_size", lambda: size)

    return set_world


def test_shards_partition_the_global_stream(dicts, world):
    schedule = RebalanceSchedule(0.1, 0.5, "cosine")  # λ changes between passes in this stretch
    world(0, 1)
    full = take(make(dicts, schedule=schedule, max_iter=300), 8000)
    shards = []
    for rank in range(4):
        world(rank, 4)
        shards.append(take(make(dicts, schedule=schedule, max_iter=300), 2000))
    # position k of the global stream goes to rank k % 4: disjoint, and together the whole stream
    for rank in range(4):
        assert shards[rank] == full[rank::4]
    assert [i for group in zip(*shards) for i in group] == full


def test_sampler_pickles(dicts):
    """DataLoader workers started with 'spawn' receive the sampler pickled."""
    import pickle

    for schedule in (RebalanceSchedule(0.1, 0.9, "cosine"), 0.5):
        s = make(dicts, schedule=schedule)
        assert take(pickle.loads(pickle.dumps(s)), 500) == take(s, 500)


def test_same_seed_same_stream(dicts):
    a = take(make(dicts, seed=7), 3000)
    assert a == take(make(dicts, seed=7), 3000)
    assert a != take(make(dicts, seed=8), 3000)


@pytest.mark.parametrize("world_size,start_iter", [(1, 37), (4, 37), (4, 0), (1, 1000)])
def test_resume_reproduces_the_tail(dicts, world, world_size, start_iter):
    schedule = RebalanceSchedule(0.0, 0.8, "linear")
    world(0, 1)
    full = take(make(dicts, schedule=schedule, max_iter=400), 8 * start_iter + 4000)
    tail = full[8 * start_iter :]
    for rank in range(world_size):
        world(rank, world_size)
        resumed = take(
            make(dicts, schedule=schedule, max_iter=400, start_iter=start_iter), 1000 // world_size
        )
        assert resumed == tail[rank::world_size][: len(resumed)]


def test_workers_of_a_dataloader_agree(dicts):
    """detectron2 runs the sampler in each DataLoader worker; together they emit the stream once."""
    sampler = make(dicts, seed=21)
    expected = take(sampler, 400)
    loader = torch.utils.data.DataLoader(
        ToIterableDataset(list(range(len(dicts))), sampler), batch_size=None, num_workers=2
    )
    got = list(itertools.islice(iter(loader), 400))
    # worker w keeps positions w, w + 2, ...; the loader alternates workers
    assert got == expected


def test_from_config(dicts):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.DATALOADER.SAMPLER_TRAIN = "DynamicRepeatFactorTrainingSampler"
    cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD = T
    cfg.DATALOADER.DRCL2.START, cfg.DATALOADER.DRCL2.END = 0.25, 0.75
    cfg.DATALOADER.DRCL2.MODE = "cosine"
    cfg.DATALOADER.DRCL2.CHUNK_ITERS = 7
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH, cfg.SEED = 2000, 16, 4
    s = DynamicRepeatFactorTrainingSampler.from_config(cfg, dicts)
    assert isinstance(s.schedule, RebalanceSchedule)
    assert (s.schedule.start, s.schedule.end, s.schedule.mode) == (0.25, 0.75, "cosine")
    assert s.lam_at(1000) == pytest.approx(s.schedule.lam(994 / 2000)) and s.lam_at(400) == 0.0
    assert s.lam_at(1000) == s.lam_at(994) != s.lam_at(1001)  # chunks of 7 iterations
    manual = make(
        dicts,
        schedule=RebalanceSchedule(0.25, 0.75, "cosine"),
        max_iter=2000,
        ims_per_batch=16,
        chunk_iters=7,
        seed=4,
    )
    assert take(s, 2000) == take(manual, 2000)
    resumed = DynamicRepeatFactorTrainingSampler.from_config(cfg, dicts, start_iter=100)
    assert take(resumed, 500) == take(manual, 2100)[1600:]
    # default SEED (-1) is used as is, like detectron2's RepeatFactorTrainingSampler does
    cfg.SEED = -1
    cfg.DATALOADER.DRCL2.START = cfg.DATALOADER.DRCL2.END = 1.0  # λ = 0 throughout
    rf = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, T)
    assert take(DynamicRepeatFactorTrainingSampler.from_config(cfg, dicts), 2000) == take(
        RepeatFactorTrainingSampler(rf, seed=cfg.SEED), 2000
    )


def test_bad_input(dicts):
    for t in (0.0, -0.5):
        with pytest.raises(ValueError, match="repeat_thresh"):
            make(dicts, repeat_thresh=t)
    with pytest.raises(ValueError, match="empty"):
        make([])
    with pytest.raises(ValueError, match="max_iter"):
        make(dicts, max_iter=0)
    with pytest.raises(ValueError, match="ims_per_batch"):
        make(dicts, ims_per_batch=0)
    with pytest.raises(ValueError, match="start_iter"):
        make(dicts, start_iter=-1)
    with pytest.raises(ValueError, match="constant"):
        make(dicts, schedule=2.0)
    with pytest.raises(TypeError, match="schedule"):
        make(dicts, schedule="linear")
    with pytest.raises(ValueError, match="must lie in"):
        take(make(dicts, schedule=lambda progress: 1.5), 1)
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.DATALOADER.DRCL2.START, cfg.DATALOADER.DRCL2.END = 0.9, 0.1
    with pytest.raises(ValueError, match="start"):
        DynamicRepeatFactorTrainingSampler.from_config(cfg, dicts)
    cfg.DATALOADER.DRCL2.START, cfg.DATALOADER.DRCL2.END = 0.0, 1.0
    cfg.DATALOADER.DRCL2.MODE = "step"
    with pytest.raises(ValueError, match="mode"):
        DynamicRepeatFactorTrainingSampler.from_config(cfg, dicts)


# --------------------------------------------------------------------------------------------------
# Trainer integration: drcl2.engine.Trainer with DATALOADER.SAMPLER_TRAIN = the dynamic sampler
# --------------------------------------------------------------------------------------------------
class _DRBRecordingModel(torch.nn.Module):
    """A one-parameter 'detector' that records the image ids of every batch it trains on."""

    seen = []

    def __init__(self, cfg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        type(self).seen.append([d["image_id"] for d in batched_inputs])
        return {"loss_dummy": (self.w**2).sum() + 1.0}


def _drb_trainer_cfg(output_dir, dataset_name):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "_DRBRecordingModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (dataset_name,)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.SAMPLER_TRAIN = "DynamicRepeatFactorTrainingSampler"
    cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD = T
    cfg.DATALOADER.DRCL2.START, cfg.DATALOADER.DRCL2.END = 0.2, 0.6
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.MAX_ITER = 150  # > 1 pass (~700 images at λ = 0 here) at 4 images per iteration
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.SEED = 13
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_trainer_uses_sampler_logs_lambda_and_resumes(dicts, tmp_path):
    import os
    import shutil

    from detectron2.data import DatasetCatalog
    from detectron2.modeling import META_ARCH_REGISTRY

    from drcl2.engine import Trainer
    from drcl2.engine.hooks import RebalanceLambdaHook

    if "_DRBRecordingModel" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_DRBRecordingModel)
    # the mapper reads no image, but the Trainer's dataset check wants the files to exist
    records = [
        dict(d, file_name=str(tmp_path / f"img{d['image_id']}.jpg"), width=64, height=48)
        for d in dicts
    ]
    for r in records:
        open(r["file_name"], "wb").close()
    name = "drb_test_trainer_train"
    if name not in DatasetCatalog:
        DatasetCatalog.register(name, lambda: records)

    class RecordingTrainer(Trainer):
        @classmethod
        def build_train_mapper(cls, cfg):
            return lambda d: {"image_id": d["image_id"]}

    # uninterrupted run
    cfg = _drb_trainer_cfg(tmp_path / "full", name)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # the sampler sees the same list as below
    _DRBRecordingModel.seen = []
    trainer = RecordingTrainer(cfg)
    assert any(isinstance(h, RebalanceLambdaHook) for h in trainer._hooks)
    trainer.resume_or_load(resume=False)
    trainer.train()
    full = _DRBRecordingModel.seen
    assert len(full) == 150
    stream = take(DynamicRepeatFactorTrainingSampler.from_config(cfg, records), 150 * 4)
    assert [i for batch in full for i in batch] == stream
    lam = dict((it, v) for v, it in trainer.storage.history("drb/lambda").values())
    assert sorted(lam) == list(range(150))
    assert lam[0] == 0.0 and lam[30] == 0.0 and lam[60] == pytest.approx(0.5) and lam[149] == 1.0
    sampler = DynamicRepeatFactorTrainingSampler.from_config(cfg, records)
    assert all(lam[i] == sampler.lam_at(i) for i in lam)  # the logged λ is the sampled one
    assert lam[69] == lam[60] < lam[70]  # taken per chunk of CHUNK_ITERS (10)

    # resume from the checkpoint of iteration 99: iterations 100..149 see the same images
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(os.path.join(cfg.OUTPUT_DIR, "model_0000099.pth"), resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000099.pth")
    cfg2 = cfg.clone()
    cfg2.OUTPUT_DIR = str(resumed_dir)
    _DRBRecordingModel.seen = []
    trainer2 = RecordingTrainer(cfg2)
    trainer2.resume_or_load(resume=True)
    assert trainer2.start_iter == 100
    trainer2.train()
    assert _DRBRecordingModel.seen == full[100:]


def test_trainer_without_dynamic_sampler_has_no_lambda_hook(dicts, tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import META_ARCH_REGISTRY

    from drcl2.engine import Trainer
    from drcl2.engine.hooks import RebalanceLambdaHook

    if "_DRBRecordingModel" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_DRBRecordingModel)
    name = "drb_test_trainer_train_plain"
    if name not in DatasetCatalog:
        (
            tmp_path / "x.jpg"
        ).touch()  # read by no mapper here; the Trainer's dataset check wants it to exist
        records = [dict(d, file_name=str(tmp_path / "x.jpg"), width=64, height=48) for d in dicts]
        DatasetCatalog.register(name, lambda: records)
    cfg = _drb_trainer_cfg(tmp_path, name)
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    trainer = Trainer(cfg)
    assert not any(isinstance(h, RebalanceLambdaHook) for h in trainer._hooks)


@pytest.mark.slow
def test_sampler_benchmark_verdicts(capsys, benchmarks):
    """`python benchmarks/benchmark.py sampler` end to end at a small size (not a timed test): each
    row's verdict says ok exactly when its measured value is within its target."""
    benchmark, _row = benchmarks("benchmark"), benchmarks("bench_sampler")._row

    assert _row("r", "", "", 1.49, 1.5, "x")[-1] == "ok"
    assert _row("r", "", "", 1.51, 1.5, "x")[-1] == "MISSED"
    args = ["--images", "3000", "--instances", "30000", "--repeats", "1", "--min-time", "0.05"]
    benchmark.main(["sampler", *args])
    out = capsys.readouterr().out
    assert "3,000 images, 30,000 instances" in out
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("|")
    ]
    judged = [r for r in rows if r[-1] in ("ok", "MISSED")]
    assert len(judged) == 3  # set-up, one pass at a fixed λ, one pass with λ moving
    for row in judged:
        measured = float(row[3].rstrip("xms/it "))
        target = float(row[4].lstrip("<= ").rstrip("xms/it "))
        assert row[-1] == ("ok" if measured <= target else "MISSED"), row
