"""
Check that resuming is exact for a config: run A trains N iterations with a checkpoint after
iteration K; run B trains the same config, stops right after that checkpoint, and is resumed with
``resume=True``. Prints, per loss term, the largest relative difference between A and B over
iterations K..N-1 (0 when the resume is exact).

    python -m drcl2.tools.check_resume --config-file configs/toy/pretrain_2drcl.yaml \\
        --iters 12 --checkpoint-at 6 --output output/check_resume MODEL.DEVICE cpu

Runs on one process (the data loader's workers as configured); use a small MAX size for a quick
check. The config's SEED is used (set it >= 0 to compare two runs).

``--num-gpus N`` runs each of the three runs as its own process tree, through detectron2's
``launch`` as ``train_net.py --num-gpus N`` does (on CUDA with N > 1: an NCCL process group; with
N = 1 detectron2 runs without one), and run B is **killed** (SIGKILL, as a crash) right after its
checkpoint, then resumed by a new process. Every process writes each iteration's losses to
``<run folder>/losses.jsonl``. The first resumed iteration's difference is printed on its own:
later iterations on a GPU can also differ by the non-deterministic kernels of the backward pass
(atomic adds), the first one only by what the checkpoint and the random state restore.
"""

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

from detectron2.engine import HookBase, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..engine import Trainer

__all__ = ["losses_of_run", "main"]


class _Stop(Exception):
    pass


class _LossRecorder(HookBase):
    """
    Records each iteration's ``loss*`` scalars (and appends them to ``log_file`` if given); after
    iteration ``stop_after``, stops the run (or, with ``kill``, kills its process: SIGKILL).
    """

    def __init__(self, stop_after=None, log_file=None, kill=False):
        self.stop_after = stop_after
        self.log_file = log_file
        self.kill = kill
        self.losses = {}

    def after_step(self):
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        self.losses[it] = {k: v for k, (v, i) in latest.items() if k.startswith("loss") and i == it}
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps({"iteration": it, **self.losses[it]}) + "\n")
        if self.stop_after is not None and it == self.stop_after:
            if self.kill:  # the checkpoint hooks ran before this one: the checkpoint is on disk
                os.kill(os.getpid(), signal.SIGKILL)
            raise _Stop()


def losses_of_run(
    cfg, resume: bool, stop_after=None, trainer_class=Trainer, log_file=None, kill=False
):
    """
    Train ``cfg`` with drcl2's Trainer (or ``trainer_class``), stopping after iteration
    ``stop_after`` if given (killing the process instead with ``kill``). Returns the trainer and
    the losses of each iteration run (``{iteration: {name: value}}``), also appended to
    ``log_file`` (JSON lines) when given.
    """
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # as default_setup: the initial weights
    trainer = trainer_class(cfg)
    recorder = _LossRecorder(stop_after, log_file if comm.is_main_process() else None, kill)
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except _Stop:
        pass
    return trainer, recorder.losses


def _launched_run(cfg, resume, stop_after, kill):
    """One run in a process launched by detectron2's ``launch`` (see ``--num-gpus``)."""
    if comm.get_world_size() > 1:  # a process of its own (one process: main() set the loggers up)
        setup_logger(name="drcl2", distributed_rank=comm.get_rank())
        setup_logger(distributed_rank=comm.get_rank())
        logging.getLogger("detectron2").setLevel(logging.WARNING)
    losses_of_run(
        cfg, resume, stop_after, log_file=os.path.join(cfg.OUTPUT_DIR, "losses.jsonl"), kill=kill
    )


def _read_losses(folder):
    losses = {}
    path = os.path.join(folder, "losses.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    losses[record.pop("iteration")] = record
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.check_resume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=12, help="N: iterations of each run")
    parser.add_argument(
        "--checkpoint-at", type=int, default=6, help="K: checkpoint after K iterations"
    )
    parser.add_argument("--output", default="output/check_resume", help="folder of the two runs")
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=0,
        help="0: the runs in this process; N >= 1: each run in its own processes, "
        "launched as train_net.py --num-gpus N, run B killed after its checkpoint",
    )
    parser.add_argument(
        "--run", choices=["uninterrupted", "interrupted", "resumed"], help=argparse.SUPPRESS
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    if not 0 < args.checkpoint_at < args.iters:
        parser.error("--checkpoint-at must lie strictly between 0 and --iters")
    setup_logger(name="drcl2")
    setup_logger()
    logging.getLogger("detectron2").setLevel(logging.WARNING)

    def cfg_for(folder):
        cfg = load_config(args.config_file, args.opts)
        cfg.merge_from_list(
            [
                "OUTPUT_DIR",
                os.path.join(args.output, folder),
                "SOLVER.MAX_ITER",
                args.iters,
                "SOLVER.CHECKPOINT_PERIOD",
                args.checkpoint_at,
                "TEST.EVAL_PERIOD",
                0,
                "DATASETS.TEST",
                (),
            ]
        )
        if cfg.SEED < 0:
            cfg.SEED = 0  # both runs must draw the same random numbers
        return cfg

    if args.run:  # a child of --num-gpus: one run, launched as train_net.py launches
        folder = "uninterrupted" if args.run == "uninterrupted" else "interrupted"
        launch(
            _launched_run,
            args.num_gpus,
            dist_url="auto",
            args=(
                cfg_for(folder),
                args.run == "resumed",
                args.checkpoint_at - 1 if args.run == "interrupted" else None,
                args.run == "interrupted",
            ),
        )
        return None
    if args.num_gpus:
        for folder in ("uninterrupted", "interrupted"):
            shutil.rmtree(os.path.join(args.output, folder), ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "drcl2.tools.check_resume",
            "--config-file",
            args.config_file,
            "--iters",
            str(args.iters),
            "--checkpoint-at",
            str(args.checkpoint_at),
            "--output",
            args.output,
            "--num-gpus",
            str(args.num_gpus),
        ]
        for run in ("uninterrupted", "interrupted", "resumed"):
            code = subprocess.run(command + ["--run", run] + list(args.opts)).returncode
            if code != (-signal.SIGKILL if run == "interrupted" else 0):
                raise SystemExit(f"check_resume: the {run} run exited with {code}.")
        full, resumed = (
            _read_losses(os.path.join(args.output, f)) for f in ("uninterrupted", "interrupted")
        )
    else:
        _, full = losses_of_run(cfg_for("uninterrupted"), resume=False)
        losses_of_run(cfg_for("interrupted"), resume=False, stop_after=args.checkpoint_at - 1)
        _, resumed = losses_of_run(cfg_for("interrupted"), resume=True)
    missing = [
        it for it in range(args.checkpoint_at, args.iters) if it not in full or it not in resumed
    ]
    if missing:
        raise SystemExit(
            f"check_resume: no losses recorded for iterations {missing} (see the runs' logs)."
        )

    def difference(its):
        worst = {}
        for it in its:
            for name, value in full[it].items():
                worst[name] = max(
                    worst.get(name, 0.0), abs(resumed[it][name] - value) / max(abs(value), 1e-12)
                )
        return worst

    worst, first = (
        difference(range(args.checkpoint_at, args.iters)),
        difference([args.checkpoint_at]),
    )
    how = (
        f"killed after {args.checkpoint_at} (--num-gpus {args.num_gpus})"
        if args.num_gpus
        else f"resumed after {args.checkpoint_at}"
    )
    print(f"config {args.config_file}, {args.iters} iterations, {how}:")
    print(
        f"{'loss':<20} largest relative difference (resumed vs uninterrupted): all resumed "
        "iterations, the first"
    )
    for name, d in worst.items():
        print(f"{name:<20} {d:.3g}  {first[name]:.3g}")
    print("RESULT " + json.dumps(worst))
    print("FIRST " + json.dumps(first))
    return worst


if __name__ == "__main__":
    main()
