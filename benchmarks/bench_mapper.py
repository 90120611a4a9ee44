"""Data pipeline: TwoViewDatasetMapper (two views) vs detectron2's DatasetMapper (one view, masks).

    python benchmarks/benchmark.py mapper
    python benchmarks/benchmark.py mapper --sizes 640x480 --rounds 20 --loader-batches 0

Generates LVIS-like JPEGs (smooth colour fields, textured shapes, JPEG quality 90) at each
``--sizes`` (default 640x480 and 1024x768, LVIS's typical sources), each with ``--instances``
polygon annotations (LVIS v1 train averages ~12), and maps them with

    detectron2  : ``detectron2.data.DatasetMapper`` of configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml
                  (the LVIS fine-tuning recipe: shortest side 640-800, flip, polygon masks on)
    two-view    : ``TwoViewDatasetMapper`` of configs/pretrain_2drcl.yaml (2DRCL v2: view 1 the
                  whole image with the same resize and flip; view 2 a random resized crop, then
                  colour jitter / grey / blur / solarization)

on one thread (torch and OpenCV), the calls of the two mappers alternating image by image so that
a busy machine slows both alike. Reported per size: the per-image median of each, the ratio
(target: two-view <= 2.0x detectron2's time, two views for one), the split of the two-view time
per part and per photometric op (median per call, and mean per image: an op that runs on some
views only counts by how often it runs; read by ``torch.profiler`` from the mapper's
``record_function`` labels, in passes of their own after the timed ones), and, with
``--loader-batches`` > 0, images/s through detectron2's ``build_detection_train_loader`` with
``DATALOADER.NUM_WORKERS`` = ``--workers`` (default 2).
"""

import contextlib
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from verdict import shown, verdict

__all__ = ["add_arguments", "run"]

TARGET_RATIO = 2.0
D2_CONFIG = "configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml"
TWO_VIEW_CONFIG = "configs/pretrain_2drcl.yaml"
# The profiler labels of TwoViewDatasetMapper's parts and of its photometric ops (view_ops).
SPLIT_PREFIXES = ("mapper/", "view_ops/")


def add_arguments(parser):
    parser.add_argument(
        "--sizes", nargs="+", default=["640x480", "1024x768"], help="WxH of the JPEGs"
    )
    parser.add_argument("--images", type=int, default=8, help="generated images per size")
    parser.add_argument("--instances", type=int, default=12, help="polygon annotations per image")
    parser.add_argument(
        "--rounds", type=int, default=6, help="timed passes over the images (per mapper)"
    )
    parser.add_argument(
        "--loader-batches",
        type=int,
        default=40,
        help="timed batches through detectron2's loader per mapper; 0: skip the loader",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS of the loader run"
    )
    parser.add_argument(
        "--batch-size", type=int, default=2, help="images per batch of the loader run"
    )
    parser.add_argument("--seed", type=int, default=0)


def _config_path(path):
    """A config of the repository: relative to the working directory, else to drcl2's checkout."""
    if os.path.exists(path):
        return path
    import drcl2

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(drcl2.__file__))), path)


def _cfg(path, *opts):
    from drcl2.config import load_config

    return load_config(_config_path(path), opts)


def _mappers():
    from detectron2.data import DatasetMapper

    from drcl2.data.two_view_mapper import TwoViewDatasetMapper

    d2 = DatasetMapper(_cfg(D2_CONFIG), True)
    assert d2.use_instance_mask, "the LVIS fine-tuning config must load masks"
    ours = TwoViewDatasetMapper(_cfg(TWO_VIEW_CONFIG), True)
    return d2, ours


def _per_image(mappers, records, rounds, seed):
    """{name: [seconds per call]}: the mappers' calls alternate image by image (order flipped each
    round)."""
    names = list(mappers)
    times = {name: [] for name in names}
    np.random.seed(seed)
    torch.manual_seed(seed)
    for k in range(rounds):
        order = names if k % 2 == 0 else names[::-1]
        for record in records:
            for name in order:
                start = time.perf_counter()
                mappers[name](record)
                times[name].append(time.perf_counter() - start)
    return times


def _split(mapper, records, rounds, seed):
    """{label: [seconds per call]} of the mapper's ``record_function`` labels, from
    ``torch.profiler`` over ``rounds`` passes over ``records``; and the number of mapper calls."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on a CPU
    np.random.seed(seed)
    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            for record in records:
                mapper(record)
    parts = {}
    for event in prof.events():
        if event.name.startswith(SPLIT_PREFIXES):
            parts.setdefault(event.name, []).append(event.cpu_time_total * 1e-6)
    # the mapper's parts first, then the ops nested in its photometric part
    order = sorted(parts, key=lambda name: not name.startswith(SPLIT_PREFIXES[0]))
    return {name: parts[name] for name in order}, rounds * len(records)


def _loader_rate(mapper, records, args):
    """Images/s through detectron2's train loader (``num_workers`` processes, batch
    ``batch_size``)."""
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler

    loader = build_detection_train_loader(
        dataset=records,
        mapper=mapper,
        sampler=TrainingSampler(len(records), seed=args.seed),
        total_batch_size=args.batch_size,
        num_workers=args.workers,
        aspect_ratio_grouping=False,
    )
    it = iter(loader)
    for _ in range(max(2, args.workers * 2)):  # workers started, first batches out
        next(it)
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(it)
    rate = args.loader_batches * args.batch_size / (time.perf_counter() - start)
    del it, loader
    return rate


def _device():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return f"CPU: {cpu}, os.cpu_count()={os.cpu_count()}"


def run(args):
    import cv2
    from tabulate import tabulate

    from drcl2.data.generated.synthetic_lvis import synthetic_lvis_jpegs

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2")
    import logging

    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("drcl2").setLevel(logging.WARNING)

    d2, ours = _mappers()
    print(
        f"mapper benchmark — {_device()}; one thread (torch and OpenCV); torch "
        f"{torch.__version__}, OpenCV {cv2.__version__}"
    )
    print(
        f"detectron2: DatasetMapper of {D2_CONFIG} (masks on); two-view: TwoViewDatasetMapper of "
        f"{TWO_VIEW_CONFIG}; {args.images} JPEGs per size, {args.instances} polygons each; "
        f"{args.rounds} rounds, per-image median"
    )
    summary = []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            records = synthetic_lvis_jpegs(
                tmp, args.images, width, height, instances=args.instances, seed=args.seed + width
            )
            for mapper in (d2, ours):  # warm-up: first-call costs (imports, caches)
                mapper(records[0])
            times = _per_image(
                {"detectron2": d2, "two-view": ours}, records, args.rounds, args.seed
            )
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["two-view"] / med["detectron2"]
            row = [
                f"{width}x{height}",
                f"{med['detectron2'] * 1e3:.1f}",
                f"{med['two-view'] * 1e3:.1f}",
                f"{shown(ratio)}x",
                f"<= {TARGET_RATIO:.1f}x",
                verdict(ratio, TARGET_RATIO),
            ]
            if args.loader_batches > 0:
                rates = {
                    name: _loader_rate(m, records, args)
                    for name, m in (("detectron2", d2), ("two-view", ours))
                }
                row[3:3] = [f"{rates['detectron2']:.1f}", f"{rates['two-view']:.1f}"]
                med.update({f"{k} images/s": v for k, v in rates.items()})
            summary.append(row)
            results[size] = dict(med, ratio=ratio)

            timings, n_images = _split(ours, records, args.rounds, args.seed)
            split = []
            for part, v in timings.items():
                split.append(
                    [
                        part,
                        f"{len(v) / n_images:.2f}",
                        f"{statistics.median(v) * 1e3:.2f}",
                        f"{sum(v) / n_images * 1e3:.2f}",
                    ]
                )
            mapper_parts = [v for k, v in timings.items() if k.startswith(SPLIT_PREFIXES[0])]
            total = sum(sum(v) for v in mapper_parts) / n_images
            split.append([f"sum of the {SPLIT_PREFIXES[0]} parts", "", "", f"{total * 1e3:.2f}"])
            print(
                f"\ntwo-view split at {width}x{height} (ms, torch.profiler; 'calls' per image: an "
                "op that runs on some views only counts by how often it ran; view_ops/ ops are "
                "inside mapper/photometric)"
            )
            print(
                tabulate(
                    split,
                    headers=["part", "calls/image", "ms per call (median)", "ms per image (mean)"],
                    tablefmt="github",
                )
            )

    headers = ["size", "detectron2 ms", "two-view ms"]
    if args.loader_batches > 0:
        headers += [
            f"detectron2 images/s ({args.workers} workers)",
            f"two-view images/s ({args.workers} workers)",
        ]
    headers += ["two-view / detectron2", "target", "verdict"]
    print(
        "\nper image (median), one thread"
        + (
            f"; images/s through build_detection_train_loader, NUM_WORKERS {args.workers}, batch "
            f"{args.batch_size}"
            if args.loader_batches > 0
            else ""
        )
    )
    print(tabulate(summary, headers=headers, tablefmt="github"))
    return results
