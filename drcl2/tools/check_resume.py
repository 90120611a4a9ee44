"""
Check that resuming is exact for a config: run A trains N iterations with a checkpoint after
iteration K; run B trains the same config, stops right after that checkpoint, and is resumed with
``resume=True``. Prints, per loss term, the largest relative difference between A and B over
iterations K..N-1 (0 when the resume is exact).

    python -m drcl2.tools.check_resume --config-file configs/toy/pretrain_2drcl.yaml \\
        --iters 12 --checkpoint-at 6 --output output/check_resume MODEL.DEVICE cpu

Runs on one process (the data loader's workers as configured); use a small MAX size for a quick
check. The config's SEED is used (set it >= 0 to compare two runs).
"""
import argparse
import json
import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..config import add_drcl2_config
from ..engine import Trainer

__all__ = ["losses_of_run", "main"]


class _Stop(Exception):
    pass


class _LossRecorder(HookBase):
    """Records each iteration's ``loss*`` scalars; stops the run after iteration ``stop_after``."""

    def __init__(self, stop_after=None):
        self.stop_after = stop_after
        self.losses = {}

    def after_step(self):
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        self.losses[it] = {k: v for k, (v, i) in latest.items() if k.startswith("loss") and i == it}
        if self.stop_after is not None and it == self.stop_after:
            raise _Stop()


def losses_of_run(cfg, resume: bool, stop_after=None, trainer_class=Trainer):
    """
    Train ``cfg`` with drcl2's Trainer (or ``trainer_class``), stopping after iteration
    ``stop_after`` if given. Returns the trainer and the losses of each iteration run
    (``{iteration: {name: value}}``).
    """
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # as default_setup: the initial weights
    trainer = trainer_class(cfg)
    recorder = _LossRecorder(stop_after)
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except _Stop:
        pass
    return trainer, recorder.losses


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.check_resume", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=12, help="N: iterations of each run")
    parser.add_argument("--checkpoint-at", type=int, default=6, help="K: checkpoint after K iterations")
    parser.add_argument("--output", default="output/check_resume", help="folder of the two runs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = parser.parse_args(argv)
    if not 0 < args.checkpoint_at < args.iters:
        parser.error("--checkpoint-at must lie strictly between 0 and --iters")
    setup_logger(name="drcl2")
    setup_logger()
    logging.getLogger("detectron2").setLevel(logging.WARNING)

    def cfg_for(folder):
        cfg = get_cfg()
        add_drcl2_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        cfg.merge_from_list([
            "OUTPUT_DIR", os.path.join(args.output, folder), "SOLVER.MAX_ITER", args.iters,
            "SOLVER.CHECKPOINT_PERIOD", args.checkpoint_at, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (),
        ])
        if cfg.SEED < 0:
            cfg.SEED = 0  # both runs must draw the same random numbers
        return cfg

    _, full = losses_of_run(cfg_for("uninterrupted"), resume=False)
    losses_of_run(cfg_for("interrupted"), resume=False, stop_after=args.checkpoint_at - 1)
    _, resumed = losses_of_run(cfg_for("interrupted"), resume=True)
    worst = {}
    for it in range(args.checkpoint_at, args.iters):
        for name, value in full[it].items():
            worst[name] = max(worst.get(name, 0.0), abs(resumed[it][name] - value) / max(abs(value), 1e-12))
    print(f"config {args.config_file}, {args.iters} iterations, resumed after {args.checkpoint_at}:")
    print(f"{'loss':<20} largest relative difference (resumed vs uninterrupted)")
    for name, d in worst.items():
        print(f"{name:<20} {d:.3g}")
    print("RESULT " + json.dumps(worst))
    return worst


if __name__ == "__main__":
    main()
