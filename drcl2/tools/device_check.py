"""
The GPU day's check: one command that records, in one report, what only a GPU can show.

    python -m drcl2.tools.device_check              # on a GPU machine (make device-check installs
                                                    first)
    python -m drcl2.tools.device_check --dry-run    # the same plan on the CPU, at tiny sizes

Each step runs in processes of its own under its own time limit (``--limit STEP=SECONDS``), so a
step that fails or hangs costs its own minutes only and the next one still runs:

    env      the device, driver, CUDA, torch, detectron2, the commit
    data     the toy LVIS set (datasets/prepare_toy_lvis.py; kept when present)
    tests    the CUDA-only tests and the model tests on the GPU (DRCL2_TEST_DEVICE=cuda)
    step     benchmark step at real size: R-50-FPN DRCL2 vs supervised Mask R-CNN, 2 images per
             GPU at LVIS resolution, AMP: seconds per step, peak memory, and the loader's images/s
             needed per GPU against what the two-view mapper gives per worker
    resume   check_resume --num-gpus 1: 20 toy pre-training iterations, killed (SIGKILL) after 10
             and resumed, losses compared with the uninterrupted run's
    study    the toy study's scratch and 2drcl arms, seed 1 (python -m drcl2.tools.study
             --config-file configs/study/toy.yaml --arms scratch,2drcl --seeds 1): its wall time

The default limits of the steps add up to 7 minutes (env takes seconds), sized from each step's
measured dry-run cost (``LIMITS``); ``make device-check`` installs first (from carried wheels: well
under a minute), 8 minutes in all at most.
The report goes to ``docs/device/<date>-<gpu>.md`` (``--dry-run``: ``report.md`` in the work
folder), every step's full output to ``--work-dir``, the steps' runs (toy data, checkpoints, the
study) to ``--work-dir``. ``--report-dir DIR`` puts the report in DIR and the logs in DIR/logs
(``--log-dir`` elsewhere): on a lent GPU machine only what is written under the folder it hands
back returns, and the runs' checkpoints are too big for it. Exit status 0 when every step passed,
else 1 with the failed steps named on the last line.

``--dry-run`` runs the same steps on the CPU with tiny sizes (a 36-image toy set, one benchmark
step of the toy model, 4 resume iterations, 2-iteration study stages), so the command is known to
work before a GPU is lent (``tests/tools/test_device_check.py`` runs it).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = ["STEPS", "main"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds per step: (GPU run, --dry-run on 2 CPU cores), sized from the dry run's measured cost.
# Two dry runs on this project's 2-core machine with other work on it (load 5-7), run 1 / run 2:
#   env 0 / 0, data 10 / 7, tests 50 / 29, step 50 / 24, resume 43 / 25, study 113 / 70 s
# (4.5 / 2.6 min in all; tests: the GPU run's selection on the emulated device, 72 tests).
# Dry run: 3x the slower run, rounded up to 10 s (env runs in this process: its limit is not
# enforced). GPU run: the dry run's cost is mostly process starts and imports (data: 0.2 s of its
# 7-10 s is generation), an upper bound for the same steps' fixed cost on the GPU machine's 16
# cores; to it comes the work only the GPU run does, estimated per step, then a margin:
#   env     CUDA start and nvidia-smi, ~10 s                                            -> 30
#   data    the full toy set: 1,364 more images at the dry run's 154 images/s, +9 s:
#           ~20 s, x2                                                                   -> 40
#   tests   the same tests without the emulation (the plain CPU run: 20 s) plus CUDA
#           start and warm-up, ~15 s: 35-50 s                                           -> 75
#   step    R-50-FPN at 640x480, AMP: 2 models x (13 interleaved + 13 alone) + 3
#           profiled steps, ~55 steps at <= 0.5 s, +30 s: ~80 s                         -> 100
#   resume  20 + 10 + 10 toy iterations (~0.05 s each) and 3 CUDA starts, +10 s: ~55 s   -> 75
#   study   what is left of 7 minutes (with the install, 8 of the 10 a lent machine gives one
#           command)                                                                    -> 120
#           Its fixed cost alone (3 trainings' starts, 2 evaluations) is 70-113 s in the dry
#           run, and the full toy schedules add 1,500 iterations: it may run out of time, and
#           the report then gives the iterations reached (its s/iter, what the step is for).
LIMITS = {
    "env": (30, 30),
    "data": (40, 30),
    "tests": (75, 150),
    "step": (100, 150),
    "resume": (75, 130),
    "study": (120, 340),
}
# The model tests run on the GPU as they are, with DRCL2_TEST_DEVICE=cuda (tests/conftest.py), and
# the tests that skip without CUDA.
# (DRCL2 models built by helpers.model's tiny_cfg take their CPU inputs through preprocess; tests
# that feed a model's parts CPU tensors directly, as test_onestage's, are CPU tests.)
GPU_TESTS = [
    "tests/modeling/test_meta_arch.py",
    "tests/modeling/test_pretext_heads.py",
    "tests/data/test_rebalance.py",
    "tests/engine/test_resume.py::test_mapping_keeps_the_callers_cuda_random_state_on_gpu",
]
# --dry-run: the same tests with DRCL2_TEST_DEVICE=emulated, the CPU playing the GPU
# (tests/helpers/emulated_device.py): a test that mixes the model's tensors with tensors made on the
# host fails there as on CUDA. The CUDA-only ones skip; the CPU half of the CUDA random-state test
# runs.
DRY_TESTS = GPU_TESTS + [
    "tests/engine/test_resume.py::test_mapping_keeps_the_callers_cuda_random_state"
]
STUDY_COMMAND = [
    "-m",
    "drcl2.tools.study",
    "--config-file",
    "configs/study/toy.yaml",
    "--arms",
    "scratch,2drcl",
    "--seeds",
    "1",
]
# --dry-run: every study stage this small (as tests/study/test_study.py's tiny runs)
TINY = [
    "MODEL.DEVICE",
    "cpu",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "32",
    "TEST.DETECTIONS_PER_IMAGE",
    "10",
]
RESUME_ITERS, RESUME_AT = (20, 10), (4, 2)  # (GPU, dry run)
# relative: the first resumed iteration must repeat the uninterrupted one
FIRST_RESUMED_TOLERANCE = 1e-6


@dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    status: str = "not run"
    lines: List[str] = field(default_factory=list)  # markdown for the report


@dataclass
class Plan:
    dry_run: bool
    work_dir: str  # the steps' runs (data, checkpoints, study)
    limits: Dict[str, float]
    env: Dict[str, str]  # the steps' environment
    log_dir: str = ""  # every step's full output (default: work_dir)
    report_dir: str = ""  # the report's folder (log paths in the report are shown relative to it)

    def __post_init__(self):
        self.log_dir = self.log_dir or self.work_dir
        self.report_dir = self.report_dir or self.work_dir

    def shown(self, path: str) -> str:
        """``path`` as the report shows it: relative to the report's folder or the repository
        when inside one of them, else absolute."""
        for root in (self.report_dir, REPO_ROOT):
            rel = os.path.relpath(path, root)
            if not rel.startswith(os.pardir):
                return rel
        return os.path.abspath(path)

    @property
    def python(self):
        return sys.executable


def _run(
    plan: Plan, step: Step, args: List[str], log_name: Optional[str] = None, env=None
) -> Optional[str]:
    """Run ``python args`` (its own process group) under the step's time limit; its output, or None
    when it failed or ran out of time (``step`` then says so)."""
    log = os.path.join(plan.log_dir, f"{log_name or step.name}.log")
    limit = plan.limits[step.name] - step.seconds
    command = [plan.python, *args]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in command)}\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(plan.env, **(env or {})),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        step.seconds += time.perf_counter() - start
    with open(log) as f:
        output = f.read()
    if code is None:
        step.status = f"ran out of its {plan.limits[step.name]:g} s"
    elif code != 0:
        step.status = f"exit status {code}"
    else:
        return output
    step.lines += [
        "",
        f"Last lines of `{plan.shown(log)}`:",
        "",
        "```",
        *_tail(output),
        "```",
    ]
    return None


def _tail(text: str, n: int = 25) -> List[str]:
    lines = [line for line in text.splitlines() if "warn" not in line.lower()]
    return lines[-n:]


def _markdown_tables(text: str) -> List[str]:
    """The markdown table lines (``|...|``) and their captions in a tool's output."""
    out = []
    for line in text.splitlines():
        table = line.startswith("|")
        if table or line.startswith(
            ("device:", "data for DRCL2", "DRCL2 step split", "Mask R-CNN step")
        ):
            if out and out[-1] and out[-1].startswith("|") != table:
                out.append("")  # a table starts (or ends) a block of its own
            out.append(line)
        elif out and out[-1] != "":
            out.append("")
    return out


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------
def step_env(plan: Plan, step: Step) -> None:
    import torch

    rows = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch)": str(torch.version.cuda),
    }
    try:
        import detectron2

        rows["detectron2"] = f"{detectron2.__version__} ({os.path.dirname(detectron2.__file__)})"
    except ImportError as e:
        rows["detectron2"] = f"missing: {e}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows["GPU"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            rows["driver"] = smi.splitlines()[0] if smi else "?"
        except (OSError, subprocess.TimeoutExpired):
            rows["driver"] = "? (nvidia-smi not found)"
    else:
        rows["GPU"] = "none"
    rows["CPU"] = f"{os.cpu_count()} cores, {_cpu_name()}"
    rows["commit"] = _commit()
    step.lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows.items()]]
    step.status, step.ok = "ok", True
    if not plan.dry_run and not torch.cuda.is_available():
        step.ok, step.status = False, "no CUDA device (use --dry-run on a CPU machine)"


def step_data(plan: Plan, step: Step) -> None:
    args = ["datasets/prepare_toy_lvis.py"]
    if plan.dry_run:
        args += ["--num-train-images", "24", "--num-val-images", "6", "--num-test-images", "6"]
    out = _run(plan, step, args)
    if out is not None:
        step.ok, step.status = True, "ok"
        step.lines.append(
            f"toy LVIS set under `{plan.env['DETECTRON2_DATASETS']}` ({step.seconds:.0f} s)"
        )


def step_tests(plan: Plan, step: Step) -> None:
    if plan.dry_run:
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *DRY_TESTS]
        env = {"DRCL2_TEST_DEVICE": "emulated"}
    else:
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
        env = {"DRCL2_TEST_DEVICE": "cuda"}
    out = _run(plan, step, args, env=env)
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", (out or _log(plan, step)), re.M)
    step.lines.insert(
        0,
        f"`pytest {' '.join(args[2:])}` with DRCL2_TEST_DEVICE={env['DRCL2_TEST_DEVICE']}: "
        f"{summary[-1] if summary else 'no summary'}",
    )
    if out is not None:
        step.ok, step.status = True, "ok"


def step_bench(plan: Plan, step: Step) -> None:
    if plan.dry_run:
        args = [
            "benchmarks/benchmark.py",
            "step",
            "--config-file",
            "configs/toy/pretrain_2drcl.yaml",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--profile-iters",
            "1",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
        ]
    else:
        args = [
            "benchmarks/benchmark.py",
            "step",
            "--config-file",
            "configs/pretrain_2drcl.yaml",
            "--device",
            "cuda",
            "--amp",
            "--batch-size",
            "2",
            "--iters",
            "10",
            "--warmup",
            "3",
            "--no-r50",
        ]
    out = _run(plan, step, args)
    if out is not None:
        step.ok, step.status = True, "ok"
        step.lines += [f"`python {' '.join(args)}`", "", *_markdown_tables(out)]


def step_resume(plan: Plan, step: Step) -> None:
    iters, at = RESUME_AT if plan.dry_run else RESUME_ITERS
    args = [
        "-m",
        "drcl2.tools.check_resume",
        "--config-file",
        "configs/toy/pretrain_2drcl.yaml",
        "--iters",
        str(iters),
        "--checkpoint-at",
        str(at),
        "--num-gpus",
        "1",
        "--output",
        os.path.join(plan.work_dir, "resume"),
    ]
    if plan.dry_run:
        args += TINY[:4] + [
            "SOLVER.IMS_PER_BATCH",
            "2",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
        ]
    else:
        args += ["MODEL.DEVICE", "cuda"]
    out = _run(plan, step, args)
    if out is None:
        return
    worst = json.loads(re.findall(r"^RESULT (.*)$", out, re.M)[-1])
    first = json.loads(re.findall(r"^FIRST (.*)$", out, re.M)[-1])
    step.lines += [
        f"`python {' '.join(args)}`",
        "",
        "| loss | largest relative difference, resumed vs uninterrupted: all resumed iterations "
        "| the first |",
        "|---|---|---|",
        *[f"| {k} | {worst[k]:.3g} | {first[k]:.3g} |" for k in worst],
    ]
    bad = {k: v for k, v in first.items() if v > FIRST_RESUMED_TOLERANCE}
    if bad:
        step.status = (
            f"the first resumed iteration differs (relative > {FIRST_RESUMED_TOLERANCE:g}): "
            f"{sorted(bad)}"
        )
    else:
        step.ok, step.status = True, "ok"


def step_study(plan: Plan, step: Step) -> None:
    out_dir = os.path.join(plan.work_dir, "study")
    args = list(STUDY_COMMAND)
    if plan.dry_run:
        args[args.index("configs/study/toy.yaml")] = _tiny_study(plan, out_dir)
    args += ["--output-dir", out_dir, "--report-dir", os.path.join(out_dir, "report")]
    out = _run(plan, step, args)
    step.lines.insert(0, f"`python {' '.join(args)}`: {step.seconds / 60:.1f} min wall")
    rows = _study_rows(os.path.join(out_dir, "report", "results.csv"))
    if rows:
        step.lines += [
            "",
            "| arm | split | task | AP | APr | iterations | wall s (the arm's runs) |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    if out is None:
        step.lines += ["", "Iterations reached: " + _study_progress(out_dir)]
        return
    step.ok, step.status = True, "ok"


def _tiny_study(plan: Plan, out_dir: str) -> str:
    """configs/study/toy.yaml with 2-iteration stages of tiny size, on the CPU (--dry-run)."""
    import yaml

    with open(os.path.join(REPO_ROOT, "configs/study/toy.yaml")) as f:
        study = yaml.safe_load(f)
    study.update(
        name="device_check_dry_run",
        output_dir=out_dir,
        device="cpu",
        jobs=1,
        checkpoint_period=1,
        schedule={k: 2 for k in study.get("schedule", {})},
    )
    for arm in study["arms"].values():
        for stage in ("pretrain", "finetune"):
            if isinstance(arm.get(stage), dict) and "config" in arm[stage]:
                arm[stage] = dict(arm[stage], opts=list(arm[stage].get("opts", [])) + TINY)
    path = os.path.join(plan.work_dir, "toy_study_dry_run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(study, f, sort_keys=False)
    return path


def _study_rows(results_csv: str) -> List[str]:
    import csv

    if not os.path.isfile(results_csv):
        return []
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    return [
        f"| {r.get('arm')} | {r.get('split')} | {r.get('task')} | {r.get('AP')} | {r.get('APr')} | "
        f"{r.get('iters')} | {r.get('wall_s')} |"
        for r in rows
    ]


def _study_progress(out_dir: str) -> str:
    """The last iteration each run of the study wrote to its metrics.json."""
    found = []
    for root, _, files in sorted(os.walk(out_dir)):
        if "metrics.json" in files:
            last = None
            with open(os.path.join(root, "metrics.json")) as f:
                for line in f:
                    try:
                        last = json.loads(line).get("iteration", last)
                    except json.JSONDecodeError:
                        pass
            found.append(f"{os.path.relpath(root, out_dir)}: {last}")
    return "; ".join(found) or "none"


STEPS: Dict[str, Callable[[Plan, Step], None]] = {
    "env": step_env,
    "data": step_data,
    "tests": step_tests,
    "step": step_bench,
    "resume": step_resume,
    "study": step_study,
}


# ------------------------------------------------------------------------------------------------
def _log(plan: Plan, step: Step) -> str:
    path = os.path.join(plan.log_dir, f"{step.name}.log")
    return open(path).read() if os.path.isfile(path) else ""


def _commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return rev or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _report(plan: Plan, steps: List[Step], total: float, path: str) -> None:
    import torch

    title = (
        "dry run on the CPU (tiny sizes)"
        if plan.dry_run
        else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    )
    lines = [
        f"# Device check: {title}",
        "",
        f"`python -m drcl2.tools.device_check{' --dry-run' if plan.dry_run else ''}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {total / 60:.1f} min in all. "
        f"Every step's full output: `{plan.shown(plan.log_dir)}/<step>.log`.",
        "",
        "| step | result | seconds | limit |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s.name} | {s.status} | {s.seconds:.0f} | {plan.limits[s.name]:g} |" for s in steps
    ]
    for s in steps:
        lines += ["", f"## {s.name}", "", *s.lines]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the same plan on the CPU, tiny sizes"
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="another time limit for a step (repeatable)",
    )
    parser.add_argument(
        "--work-dir",
        default="output/device_check",
        help="the steps' runs (toy data, checkpoints, study), and their logs unless --log-dir or "
        "--report-dir is given",
    )
    parser.add_argument(
        "--report-dir",
        default=None,
        help="the report's folder, and its logs/ folder the steps' logs (small files only: what "
        "a lent GPU machine hands back); default: docs/device/ (--dry-run: --work-dir), the logs "
        "in --work-dir",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="every step's full output (default: <--report-dir>/logs when it is given, else "
        "--work-dir)",
    )
    parser.add_argument(
        "--report",
        default=None,
        help="the report's path (default: <--report-dir>/<date>-<gpu>.md; --dry-run: "
        "<--report-dir>/report.md)",
    )
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; the steps are {list(STEPS)}")
    limits = {k: v[1 if args.dry_run else 0] for k, v in LIMITS.items()}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds:
            parser.error(f"--limit {item}: expected STEP=SECONDS with STEP in {list(STEPS)}")
        limits[name] = float(seconds)
    work_dir = os.path.abspath(args.work_dir)
    if args.report:
        report_dir = os.path.dirname(os.path.abspath(args.report))
    elif args.report_dir:
        report_dir = os.path.abspath(args.report_dir)
    else:
        report_dir = work_dir if args.dry_run else os.path.join(REPO_ROOT, "docs", "device")
    if args.log_dir:
        log_dir = os.path.abspath(args.log_dir)
    else:
        log_dir = os.path.join(report_dir, "logs") if args.report_dir else work_dir
    for folder in (work_dir, log_dir, report_dir):
        os.makedirs(folder, exist_ok=True)
    for name in names:  # each run starts its logs afresh
        if os.path.exists(os.path.join(log_dir, f"{name}.log")):
            os.remove(os.path.join(log_dir, f"{name}.log"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if args.dry_run:
        env.update(
            DETECTRON2_DATASETS=os.path.join(work_dir, "datasets"),
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
        )
    else:
        env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO_ROOT, "datasets"))
    plan = Plan(
        dry_run=args.dry_run,
        work_dir=work_dir,
        limits=limits,
        env=env,
        log_dir=log_dir,
        report_dir=report_dir,
    )

    start = time.perf_counter()
    steps = []
    for name in names:
        step = Step(name)
        print(f"[device_check] {name} (limit {limits[name]:g} s) ...", flush=True)
        t = time.perf_counter()
        try:
            STEPS[name](plan, step)
        except Exception as e:  # a step's own bug: reported, and the next step still runs
            step.ok, step.status = False, f"{type(e).__name__}: {e}"
        step.seconds = max(step.seconds, time.perf_counter() - t)
        print(f"[device_check] {name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        steps.append(step)
    total = time.perf_counter() - start

    import torch

    gpu = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and not args.dry_run
        else "cpu-dry-run"
    )
    path = (
        os.path.abspath(args.report)
        if args.report
        else os.path.join(
            report_dir,
            "report.md" if args.dry_run else f"{datetime.date.today().isoformat()}-{_slug(gpu)}.md",
        )
    )
    _report(plan, steps, total, path)
    failed = [s.name for s in steps if not s.ok]
    print(f"[device_check] report: {path} ({total / 60:.1f} min)")
    if failed:
        print(
            "[device_check] FAILED: "
            f"{', '.join(f'{s.name} ({s.status})' for s in steps if not s.ok)}"
        )
        return 1
    print("[device_check] every step passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
