"""
DRCL2 training step vs a supervised Mask R-CNN (GeneralizedRCNN) step, same device, batch and
backbone.

    python benchmarks/benchmark.py step --config-file configs/toy/pretrain_2drcl.yaml
    python benchmarks/benchmark.py step --config-file configs/pretrain_2drcl.yaml \\
        --baseline-config configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml --device cuda --amp \\
        --batch-size 2 --dataset lvis_v1_toy_train

One step = forward, backward, optimizer step (SGD); DRCL2's forward includes its EMA target update
(the ``drcl2.ema`` scope). The images are mapped once (data loading is not timed); the same dataset
images feed both models, through TwoViewDatasetMapper (DRCL2) and detectron2's DatasetMapper with
masks (Mask R-CNN).

``--num-processes N`` (N > 1) times the DDP step instead: N processes started by detectron2's
``launch`` (gloo on CPU, NCCL on CUDA), each model wrapped as drcl2's Trainer wraps it, each rank
on its own ``--batch-size`` images (the next ones of the dataset), both models' steps alternating;
reported: rank 0's median step time (every step ends in DDP's gradient all-reduce, so all ranks
take the same time).

Reported per model: median step time over ``--iters`` timed steps (after ``--warmup``) twice: with
both models in one process, their steps alternating (what a busy, shared machine slows alike: the
figure for the ratio), and each model alone in its own process; images/s (from the interleaved
time), peak memory, and for DRCL2 the time split by part: each ``drcl2.*`` ``record_function`` scope
of the model (online forward, target forward, masking, each head / loss) from torch.profiler over
``--profile-iters`` extra steps, plus backward, optimizer step and EMA update timed directly. On
CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``; ``--keep-denormals`` to keep
them): otherwise tiny gradients hit x86's slow path and dominate the timings. The flag holds for the
calling thread only, so CPU runs use one thread unless ``--threads`` says otherwise (with two
threads on a shared 2-core machine, the second thread's denormals and other processes made the same
run vary 5x).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU the peak
resident set size (``ru_maxrss``) of a fresh process that runs only that model's measurement (so
it includes the Python runtime and the model, and is comparable between the two rows).
"""

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time

import torch
from tabulate import tabulate

KINDS = ("Mask R-CNN (supervised)", "DRCL2")

DEFAULT_BASELINES = {
    "configs/toy/pretrain_2drcl.yaml": "configs/toy/mask_rcnn_finetune.yaml",
    "configs/pretrain_2drcl.yaml": "configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml",
    "configs/pretrain_2drcl_R_101.yaml": "configs/LVISv1/mask_rcnn_R_101_FPN_1x.yaml",
}


def add_arguments(parser):
    parser.add_argument(
        "--config-file", default="configs/toy/pretrain_2drcl.yaml", help="DRCL2 config"
    )
    parser.add_argument(
        "--baseline-config",
        default=None,
        help="supervised Mask R-CNN config (default: the matching fine-tuning config)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="registered dataset for the batch, or "
        f"'{GENERATED}' (default: the DRCL2 config's first DATASETS.TRAIN; when that is "
        "not on disk, e.g. LVIS v1, generated 640x480 JPEGs with its number of classes)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--iters", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--profile-iters", type=int, default=3, help="profiled steps for the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16) forward, as SOLVER.AMP")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default on CPU: 1, see above; on CUDA: torch's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="on CPU, do not flush denormal floats to zero (default: flush)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="DDP processes (> 1: time the distributed step, see above)",
    )
    parser.add_argument(
        "--no-r50",
        action="store_true",
        help="on CUDA, skip the extra R-50-FPN "
        "run (configs/pretrain_2drcl.yaml, batch 2, AMP, on the toy images)",
    )
    parser.add_argument("opts", nargs="*", default=[], help="KEY VALUE overrides for both configs")


def _cfg(path, args):
    from drcl2.config import load_config

    return load_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, *args.opts])


GENERATED = "generated"


def _generated_dicts(cfg, args):
    """
    LVIS-resolution JPEGs (640x480, 12 polygons each, ``cfg.MODEL.ROI_HEADS.NUM_CLASSES`` classes)
    generated once into the temp folder: the batch when the config's dataset is not on disk.
    """
    import tempfile

    from drcl2.data.generated.synthetic_lvis import synthetic_lvis_jpegs

    n = max(4, args.batch_size * args.num_processes)
    folder = os.path.join(tempfile.gettempdir(), f"drcl2_bench_step_{n}x640x480")
    os.makedirs(folder, exist_ok=True)  # same seed: every process writes the same files
    return synthetic_lvis_jpegs(
        folder, n, 640, 480, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES, seed=args.seed
    )


def _dataset_dicts(cfg, args):
    """The dataset the batch comes from: --dataset, else the config's first DATASETS.TRAIN, else
    (not on disk) generated LVIS-resolution images; returns (dicts, its name)."""
    from detectron2.data import DatasetCatalog

    name = args.dataset or cfg.DATASETS.TRAIN[0]
    if name != GENERATED:
        try:
            return DatasetCatalog.get(name), name
        except (FileNotFoundError, OSError, AssertionError, KeyError):
            if args.dataset:
                raise
    return _generated_dicts(cfg, args), "generated 640x480 JPEGs"


def _batch(cfg, args, two_views: bool, rank: int = 0):
    import numpy as np
    from detectron2.data import DatasetMapper

    from drcl2.data.two_view_mapper import TwoViewDatasetMapper

    first = rank * args.batch_size
    dicts = [d for d in _dataset_dicts(cfg, args)[0] if d.get("annotations")][
        first : first + args.batch_size
    ]
    mapper = TwoViewDatasetMapper(cfg, True) if two_views else DatasetMapper(cfg, True)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return [mapper(d) for d in dicts]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prepare(kind, args, ddp: bool = False):
    """
    Build one model, its fixed batch and optimizer; returns (model, step function, config path).
    ``ddp``: wrap the model in DistributedDataParallel (this rank's images).
    """
    from detectron2.modeling import build_model
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    import drcl2  # noqa: F401  registers datasets and DRCL2
    from drcl2.data.rebalance import build_rebalance_schedule
    from drcl2.engine import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda") and not args.keep_denormals:
        # Denormal floats (tiny gradients / momentum buffers) make x86 arithmetic many times
        # slower and would time the CPU's slow path rather than the models' work.
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    path = args.config_file if kind == "DRCL2" else args.baseline_config
    cfg = _cfg(path, args)
    model = build_model(cfg)
    model.train()
    is_drcl2 = kind == "DRCL2"
    if is_drcl2:
        model.rebalance_schedule = build_rebalance_schedule(cfg)
        model.set_class_statistics(_dataset_dicts(cfg, args)[0])
    data = _batch(cfg, args, two_views=is_drcl2, rank=comm.get_rank())
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = Trainer.build_ddp_model(cfg, model) if ddp else model
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.float16, enabled=args.amp)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.amp)
    max_iter = max(cfg.SOLVER.MAX_ITER, 1)

    def step(it, parts=None):
        t0 = time.perf_counter()
        with EventStorage(it % max_iter), autocast:
            losses = wrapped(data)
        loss = sum(losses.values())
        _sync(args.device)
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        _sync(args.device)
        t2 = time.perf_counter()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        t3 = time.perf_counter()
        if parts is not None:
            timed = [("forward (all)", t1 - t0), ("backward", t2 - t1), ("optimizer step", t3 - t2)]
            for name, dt in timed:
                parts.setdefault(name, []).append(dt)
        return t3 - t0

    return model, step, path


def _interleaved(args, queue, ddp: bool = False):
    """
    Step times of both models built in one process, their steps alternating, so that a busy
    machine slows both alike (the ratio is the figure to trust on shared CPUs).
    """
    steps = {kind: _prepare(kind, args, ddp)[1] for kind in KINDS}
    for it in range(args.warmup):
        for kind in KINDS:
            steps[kind](it)
    times = {kind: [] for kind in KINDS}
    for it in range(args.iters):
        for kind in KINDS:
            times[kind].append(steps[kind](args.warmup + it))
    queue.put({kind: statistics.median(v) for kind, v in times.items()})


def _measure(kind, args, queue):
    """Runs in a fresh process: build, warm up, time, profile; puts a result dict on ``queue``."""
    model, step, path = _prepare(kind, args)
    is_drcl2 = kind == "DRCL2"
    params = [p for p in model.parameters() if p.requires_grad]
    for it in range(args.warmup):
        step(it)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    parts = {}
    times = [step(args.warmup + it, parts) for it in range(args.iters)]
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "CUDA max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory_kind = "peak RSS of the process"

    split = {name: statistics.median(v) for name, v in parts.items()}
    if is_drcl2 and args.profile_iters > 0:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if args.device.startswith("cuda") else []
        )
        with profile(activities=activities) as prof:
            for it in range(args.profile_iters):
                step(args.warmup + args.iters + it)
        for event in prof.key_averages():
            if event.key.startswith("drcl2."):
                total = (
                    getattr(event, "device_time_total", 0) if args.device.startswith("cuda") else 0
                )
                total = total or event.cpu_time_total
                split["  " + event.key] = total / 1e6 / args.profile_iters
    queue.put(
        {
            "kind": kind,
            "config": path,
            "median_s": statistics.median(times),
            "peak_mib": peak,
            "memory_kind": memory_kind,
            "split": split,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params),
        }
    )


def run(args):
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    if args.num_processes > 1:
        _compare_ddp(args)
        return
    _compare(args)
    if args.device.startswith("cuda") and not args.no_r50:
        import copy

        r50 = copy.copy(args)
        r50.config_file, r50.baseline_config = "configs/pretrain_2drcl.yaml", None
        r50.batch_size, r50.amp = 2, True
        r50.dataset = args.dataset or GENERATED  # LVIS v1 itself may not be on disk
        print()
        print("R-50-FPN, batch 2, AMP:")
        _compare(r50)


def _in_subprocess(fn, *fn_args):
    """Run ``fn(*fn_args, queue)`` in a fresh (spawned) process and return what it puts."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*fn_args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(
            f"benchmark process {fn.__name__}{fn_args[:1]} failed (exit {proc.exitcode})"
        )
    return result


def _compare(args):
    if args.baseline_config is None:
        args.baseline_config = DEFAULT_BASELINES.get(os.path.normpath(args.config_file))
        if args.baseline_config is None:
            raise SystemExit(f"No default baseline for {args.config_file}; pass --baseline-config.")
    results = {kind: _in_subprocess(_measure, kind, args) for kind in KINDS}
    interleaved = _in_subprocess(_interleaved, args)

    base, ours = results["Mask R-CNN (supervised)"], results["DRCL2"]
    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(0)})"
    else:
        threads = args.threads or torch.get_num_threads()
        device += f" ({platform.processor() or platform.machine()}, {threads} threads)"
    print(
        f"device: {device}; batch {args.batch_size} images; AMP {'on' if args.amp else 'off'}; "
        f"{args.warmup} warm-up + {args.iters} timed steps (median); memory: {ours['memory_kind']}"
    )
    rows = []
    for r in (base, ours):
        t = interleaved[r["kind"]]
        rows.append(
            [
                r["kind"],
                r["config"],
                f"{r['params'] / 1e6:.1f}M ({r['trainable'] / 1e6:.1f}M)",
                f"{t * 1000:.0f}",
                f"{r['median_s'] * 1000:.0f}",
                f"{args.batch_size / t:.2f}",
                f"{r['peak_mib']:.0f}",
            ]
        )
    ratio = interleaved["DRCL2"] / interleaved[base["kind"]]
    rows.append(
        [
            "DRCL2 / Mask R-CNN",
            "",
            "",
            f"{ratio:.2f}x",
            f"{ours['median_s'] / base['median_s']:.2f}x",
            "",
            f"{ours['peak_mib'] / base['peak_mib']:.2f}x",
        ]
    )
    print(
        tabulate(
            rows,
            headers=[
                "model",
                "config",
                "params (trainable)",
                "step ms (interleaved)",
                "step ms (alone)",
                "images/s",
                "peak MiB",
            ],
            tablefmt="github",
        )
    )
    print()
    split = [[name, f"{t * 1000:.0f}"] for name, t in ours["split"].items()]
    base_split = [[name, f"{t * 1000:.0f}"] for name, t in base["split"].items()]
    print(
        "DRCL2 step split (ms, median of the timed steps; indented 'drcl2.*' rows: torch.profiler "
        "scopes inside the forward, averaged over the profiled steps, profiler overhead included)"
    )
    print(tabulate(split, headers=["part", "ms"], tablefmt="github"))
    print()
    print("Mask R-CNN step split (ms):")
    print(tabulate(base_split, headers=["part", "ms"], tablefmt="github"))
    _workers_needed(args, interleaved["DRCL2"])


def _workers_needed(args, step_s, rounds=3):
    """
    How fast the data must come at this step time: DRCL2 takes ``batch_size / step_s`` images/s
    per device; the two-view mapper's per-image time on one thread (median over the batch's
    images, ``rounds`` passes) gives the data-loader worker processes one device needs.
    """
    import math

    import numpy as np

    import drcl2  # noqa: F401  registers the datasets
    from drcl2.data.two_view_mapper import TwoViewDatasetMapper

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import cv2

        cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        cfg = _cfg(args.config_file, args)
        dicts, source = _dataset_dicts(cfg, args)
        dicts = [d for d in dicts if d.get("annotations")][: max(args.batch_size, 4)]
        mapper = TwoViewDatasetMapper(cfg, True)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        mapper(dicts[0])
        times = []
        for _ in range(rounds):
            for d in dicts:
                t = time.perf_counter()
                mapper(d)
                times.append(time.perf_counter() - t)
        cv2.setNumThreads(cv2_threads)
    finally:
        torch.set_num_threads(previous)
    per_image = statistics.median(times)
    need = args.batch_size / step_s
    print()
    print(
        f"data for DRCL2 at this step time: {need:.2f} images/s per device; TwoViewDatasetMapper "
        f"({source}) maps one image in "
        f"{per_image * 1000:.0f} ms on one thread = {1 / per_image:.1f} images/s per worker -> "
        f">= {max(1, math.ceil(need * per_image))} DATALOADER.NUM_WORKERS per device "
        f"({need * per_image:.2f} workers fully busy)"
    )


class _FileQueue:
    """``put`` of rank 0 into a file: what launch()'s processes hand back to the caller."""

    def __init__(self, path):
        self.path = path

    def put(self, result):
        from detectron2.utils import comm

        if comm.is_main_process():
            torch.save(result, self.path)


def _ddp_worker(args, path):
    _interleaved(args, _FileQueue(path), ddp=True)


def _compare_ddp(args):
    import tempfile

    from detectron2.engine import launch

    if args.baseline_config is None:
        args.baseline_config = DEFAULT_BASELINES.get(os.path.normpath(args.config_file))
        if args.baseline_config is None:
            raise SystemExit(f"No default baseline for {args.config_file}; pass --baseline-config.")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        launch(_ddp_worker, args.num_processes, dist_url="auto", args=(args, path))
        times = torch.load(path, weights_only=False)
    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(0)}), NCCL"
    else:
        cpu = platform.processor() or platform.machine()
        device += f" ({cpu}, {args.threads} thread(s) per process), gloo"
    print(
        f"device: {device}; {args.num_processes} DDP processes x {args.batch_size} images; AMP "
        f"{'on' if args.amp else 'off'}; {args.warmup} warm-up + {args.iters} timed steps (median, "
        "rank 0), both models' steps alternating"
    )
    base, ours = times[KINDS[0]], times[KINDS[1]]
    rows = [
        [
            kind,
            f"{times[kind] * 1000:.0f}",
            f"{args.num_processes * args.batch_size / times[kind]:.2f}",
        ]
        for kind in KINDS
    ]
    rows.append(["DRCL2 / Mask R-CNN", f"{ours / base:.2f}x", ""])
    print(
        tabulate(
            rows,
            headers=["model", "step ms (interleaved)", "images/s (all processes)"],
            tablefmt="github",
        )
    )
