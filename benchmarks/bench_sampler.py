"""
Dynamic rebalancing sampler vs detectron2's RepeatFactorTrainingSampler, at LVIS v1 scale.

    python benchmarks/benchmark.py sampler [--repeats 5] [--dataset NAME]

By default builds LVIS-v1-scale metadata: 100,170 images, the 1,203 LVIS v1 classes each in as many
images as in the real training set (detectron2's ``lvis_v1_category_image_count.py``) and 1,270,141
instances (LVIS v1 train's count; the instances beyond one per (image, class) pair go to pairs
with probability ∝ sqrt(class image count), frequent classes being the crowded ones).
``--dataset`` uses a registered dataset instead (e.g. ``lvis_v1_toy_train``).

Measured, in one run, on the same dataset dicts and generator seed:

* set-up: ours = class statistics + both per-image factor sets (what the sampler's constructor does)
  vs detectron2's ``repeat_factors_from_category_frequency``. Target: ≤ 1.5× detectron2.
* one pass at a fixed λ: the indices of one pass over the data (stochastic rounding, repeat,
  shuffle, list) vs detectron2's ``_get_epoch_indices`` + shuffle. Target: ≤ 1.0× detectron2.
* one pass while λ moves: ours re-takes λ every ``--chunk-iters`` iterations of ``--ims-per-batch``
  images and re-draws the rest of the pass each time λ changes (a schedule that rises through the
  pass). Reported per training iteration: every DataLoader worker computes the global stream, so
  this is what each worker adds to an iteration. Target: ≤ 1 ms per iteration (< 1% of a typical
  multi-GPU LVIS step).
Both are also measured end to end through each sampler's iterator.
"""

import gc
import itertools
import platform
import statistics
import time

import numpy as np
import torch
from tabulate import tabulate
from verdict import shown, verdict

LVIS_V1_TRAIN_IMAGES = 100_170
LVIS_V1_TRAIN_INSTANCES = 1_270_141


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement")
    parser.add_argument("--images", type=int, default=LVIS_V1_TRAIN_IMAGES)
    parser.add_argument("--instances", type=int, default=LVIS_V1_TRAIN_INSTANCES)
    parser.add_argument("--repeat-thresh", type=float, default=0.001, help="t (default 0.001)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; DataLoader workers use 1)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="a registered detectron2 dataset to use instead of the generated one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ims-per-batch", type=int, default=16, help="images per iteration (default 16)"
    )
    parser.add_argument(
        "--chunk-iters", type=int, default=10, help="DATALOADER.DRCL2.CHUNK_ITERS (default 10)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.5,
        help="repeat fast measurements until they total this many seconds",
    )


def lvis_v1_scale_dataset_dicts(
    num_images=LVIS_V1_TRAIN_IMAGES, num_instances=LVIS_V1_TRAIN_INSTANCES, seed=0
):
    """
    Generated detectron2 dataset dicts with LVIS v1 train's class statistics: class c (contiguous
    id) is in exactly its ``image_count`` of detectron2's ``LVIS_CATEGORY_IMAGE_COUNT`` images
    (scaled by num_images / 100,170 when that differs, at least 1), and there are
    ``max(num_instances, number of (image, class) pairs)`` instances in all.
    """
    from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

    rng = np.random.default_rng(seed)
    scale = num_images / LVIS_V1_TRAIN_IMAGES
    counts = [
        min(max(1, round(c["image_count"] * scale)), num_images)
        for c in sorted(LVIS_CATEGORY_IMAGE_COUNT, key=lambda c: c["id"])
    ]
    pair_img = np.concatenate([rng.choice(num_images, n, replace=False) for n in counts])
    pair_cls = np.repeat(np.arange(len(counts)), counts)
    extra = max(num_instances - len(pair_img), 0)
    weight = np.sqrt(np.asarray(counts, dtype=np.float64))[pair_cls]
    per_pair = 1 + rng.multinomial(extra, weight / weight.sum())
    inst_img = np.repeat(pair_img, per_pair)
    inst_cls = np.repeat(pair_cls, per_pair)
    order = np.argsort(inst_img, kind="stable")
    inst_img, inst_cls = inst_img[order], inst_cls[order]
    # shuffle instances inside each image so classes are not sorted (as in real annotation files)
    inst_cls = inst_cls[np.lexsort((rng.random(inst_cls.size), inst_img))]
    bounds = np.searchsorted(inst_img, np.arange(num_images + 1))
    cls_list = inst_cls.tolist()
    return [
        {
            "file_name": f"train2017/{i:012d}.jpg",
            "image_id": i,
            "height": 480,
            "width": 640,
            "annotations": [{"category_id": c} for c in cls_list[bounds[i] : bounds[i + 1]]],
        }
        for i in range(num_images)
    ]


def _time(fn, repeats, min_total_s=0.5, max_repeats=200):
    """
    Median and min seconds of calls of fn(k) (k = repeat index): ``repeats`` calls, more (up to
    ``max_repeats``) while they total less than ``min_total_s`` — sub-millisecond timings on a
    shared machine need many samples for a stable median.
    """
    times = []
    gc.collect()
    gc.disable()  # as timeit does: no collection of the dataset dicts' objects inside a timing
    try:
        for k in itertools.count():
            if k >= repeats and (sum(times) >= min_total_s or k >= max_repeats):
                break
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return statistics.median(times), min(times)


def _row(name, theirs, ours, measured, target, unit):
    """A table row whose verdict is ``ok`` when ``measured``, as printed, is ``<= target`` (both in
    ``unit``)."""
    return [
        name,
        theirs,
        ours,
        f"{shown(measured)}{unit}",
        f"<= {target:.1f}{unit}",
        verdict(measured, target),
    ]


def _device():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def run(args):
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from drcl2.data.samplers import DynamicRepeatFactorTrainingSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.dataset:
        from detectron2.data import DatasetCatalog

        import drcl2  # noqa: F401  (registers drcl2's datasets)

        dicts = DatasetCatalog.get(args.dataset)
        source = f"dataset {args.dataset}"
    else:
        dicts = lvis_v1_scale_dataset_dicts(args.images, args.instances, seed=args.seed)
        source = (
            "generated at LVIS v1 train scale (real per-class image counts)"
            if args.images == LVIS_V1_TRAIN_IMAGES
            else f"generated, LVIS v1 per-class image counts scaled to {args.images:,} images"
        )
    gen_s = time.perf_counter() - t0
    if not dicts:
        raise SystemExit(f"{source} is empty: nothing to benchmark.")
    num_inst = sum(len(d.get("annotations") or ()) for d in dicts)
    num_cls = len({a["category_id"] for d in dicts for a in d.get("annotations") or ()})
    t, reps = args.repeat_thresh, max(args.repeats, 1)

    # ---- set-up -------------------------------------------------------------------------------
    d2_setup = _time(
        lambda k: RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t),
        reps,
        args.min_time,
    )

    def build_ours(k):
        return DynamicRepeatFactorTrainingSampler(
            dicts, repeat_thresh=t, schedule=0.0, max_iter=1, ims_per_batch=1, seed=args.seed
        )

    our_setup = _time(build_ours, reps, args.min_time)

    rf = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t)
    d2 = RepeatFactorTrainingSampler(rf, seed=args.seed)
    ours = build_ours(0)
    # correctness guard: at λ = 0 both give the same factors and the same stream
    assert torch.equal(ours.repeat_factors_at(0.0), rf), "λ = 0 factors differ from detectron2's"
    assert list(itertools.islice(iter(ours), 20_000)) == list(itertools.islice(iter(d2), 20_000))

    # ---- one pass of indices ------------------------------------------------------------------
    g_d2 = torch.Generator().manual_seed(args.seed)

    def d2_pass(k):
        indices = d2._get_epoch_indices(g_d2)
        return indices[torch.randperm(len(indices), generator=g_d2)].tolist()

    pass_len = {lam: float(ours.repeat_factors_at(lam).double().sum()) for lam in (0.0, 0.5, 1.0)}
    ipb, chunk = args.ims_per_batch, args.chunk_iters

    def one_pass(schedule, max_iter):
        """One pass of our global stream (as the iterator would list it), λ following
        ``schedule``."""
        sampler = DynamicRepeatFactorTrainingSampler(
            dicts, repeat_thresh=t, schedule=schedule, max_iter=max_iter, ims_per_batch=ipb,
            chunk_iters=chunk, seed=args.seed,
        )  # fmt: skip
        n = int(pass_len[0.5])

        def run(k):
            out = []
            for _, block in sampler._global_stream():
                out.extend(block.tolist())
                if len(out) >= n:
                    return out

        return run

    pass_iters = pass_len[0.5] / ipb
    fixed_t = _time(one_pass(0.5, 1), reps, args.min_time)
    # λ rises from 0 to 1 over one pass, so it changes at every chunk boundary
    moving_t = _time(one_pass(lambda p: min(p, 1.0), max(int(pass_iters), 1)), reps, args.min_time)
    d2_pass_t = _time(d2_pass, reps, args.min_time)
    moving_ms_per_iter = tuple(x * 1e3 / pass_iters for x in moving_t)

    # ---- end to end through the iterators (several passes) -----------------------------------
    n_passes = 2
    n_items = int(pass_len[0.0] * n_passes)
    moving = DynamicRepeatFactorTrainingSampler(
        dicts,
        repeat_thresh=t,
        schedule=lambda p: min(p, 1.0),
        max_iter=max(n_items // ipb, 1),
        ims_per_batch=ipb,
        chunk_iters=chunk,
        seed=args.seed,
    )

    def pull(sampler):
        return lambda k: sum(1 for _ in itertools.islice(iter(sampler), n_items))

    d2_iter_t = [x / n_passes for x in _time(pull(d2), reps, args.min_time)]
    our_iter_t = [x / n_passes for x in _time(pull(moving), reps, args.min_time)]

    # ---- report -------------------------------------------------------------------------------
    print(f"\nDRB sampler benchmark — {_device()}")
    print(
        f"data: {source}: {len(dicts):,} images, {num_inst:,} instances, {num_cls:,} classes (set "
        f"built in {gen_s:.1f} s); t = {t}; >= {reps} repeats each (more for fast ones), median "
        "(min)"
    )
    print(
        f"images per pass: {pass_len[0.0]:,.0f} at λ=0 (= detectron2), {pass_len[0.5]:,.0f} at "
        f"λ=0.5, {pass_len[1.0]:,.0f} at λ=1\n"
    )

    def ms(x):
        return f"{x[0] * 1e3:.1f} ({x[1] * 1e3:.1f})"

    rows = [
        _row(
            "set-up (statistics + factors)",
            ms(d2_setup),
            ms(our_setup),
            our_setup[0] / d2_setup[0],
            1.5,
            "x",
        ),
        _row(
            "one pass of indices, λ fixed",
            ms(d2_pass_t),
            ms(fixed_t),
            fixed_t[0] / d2_pass_t[0],
            1.0,
            "x",
        ),
        _row(
            f"one pass, λ moving (re-drawn every {chunk} it x {ipb} images)",
            ms(d2_pass_t),
            ms(moving_t),
            moving_ms_per_iter[0],
            1.0,
            " ms/it",
        ),
        [
            f"one pass through the iterator, λ moving (mean of {n_passes})",
            ms(d2_iter_t),
            ms(our_iter_t),
            f"{our_iter_t[0] / d2_iter_t[0]:.2f}x",
            "",
            "",
        ],
    ]
    print(
        tabulate(
            rows,
            headers=["ms", "detectron2 RFS", "DRB (ours)", "measured", "target", "verdict"],
            tablefmt="github",
        )
    )
