"""
Runs a study: every (arm, seed) as the user would run it — ``train_net.py`` in a subprocess with
the study's ``--num-gpus`` (detectron2's ``launch``), pre-training, export, fine-tuning and LVIS
evaluation on the study's val and test splits — resumable and with progress lines.

Each stage's folder (``OUTPUT_DIR/<arm>/seed<k>/<stage>``) holds detectron2's own outputs
(``log.txt``, ``metrics.json``, checkpoints, ``inference/<dataset>/per_class_ap.csv``), the
subprocess's ``stdout.log``, and, once the stage has finished, ``study_stage.json`` (its command,
wall time and, for fine-tuning, the evaluation results). A finished stage is skipped; an
interrupted one runs again with ``--resume`` and goes on from its last checkpoint.
"""

import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..checkpoint import atomic_write
from ..export import export_finetune_weights, export_parts
from .records import STAGE_FILE, read_stage, source_record_path, stage_done, sync_records
from .spec import Arm, Stage, Study

__all__ = [
    "StudyRunner",
    "finetune_results",
    "inference_dir",
    "train_net_path",
]

EXPORT_NAME = "model_final_finetune.pth"
PARTS_NAME = "init_parts.pth"  # a fine-tuning stage that starts from some parts of the export
LABELS = {"pretrain": "pre-train", "finetune": "fine-tune"}


def train_net_path() -> str:
    """The repository's ``train_net.py`` (working directory first, then next to the drcl2
    package)."""
    import drcl2

    candidates = [
        os.path.abspath("train_net.py"),
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(drcl2.__file__))), "train_net.py"
        ),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"train_net.py not found (looked at {candidates}); run the study from the drcl2 repository "
        "root."
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}" if seconds < 600 else f"{seconds / 60:.0f}"


def _write_json(path: str, data) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, sort_keys=True), mode="w")


def inference_dir(stage_dir: str, dataset: str, num_datasets: int) -> str:
    """Where drcl2's Trainer writes the evaluation files of ``dataset`` (one folder per dataset
    when a run evaluates several)."""
    base = os.path.join(stage_dir, "inference")
    return os.path.join(base, dataset) if num_datasets > 1 else base


def finetune_results(
    stage_dir: str, datasets: Dict[str, str], splits=("val", "test")
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """
    The final evaluation of a fine-tuning stage, from detectron2's ``metrics.json``:
    ``{split: {task: {metric: value}}}`` for ``splits`` (names in ``datasets``).
    """
    path = os.path.join(stage_dir, "metrics.json")
    last = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if any(k.endswith("/AP") for k in record):
                last = record
    if last is None:
        raise RuntimeError(
            f"{path} holds no evaluation results: the fine-tuning run did not evaluate."
        )
    out = {}
    for split in splits:
        # detectron2 prefixes the keys with the dataset name only when a run evaluates several
        prefix = datasets[split] + "/" if len(splits) > 1 else ""
        for key, value in last.items():
            if key.startswith(prefix) and key.count("/") == 1 + bool(prefix):
                task, metric = key[len(prefix) :].split("/")
                out.setdefault(split, {}).setdefault(task, {})[metric] = value
        if split not in out:
            raise RuntimeError(f"{path}: no results for {datasets[split]} in the last evaluation.")
    return out


SOURCE_PART = "backbone.bottom_up"  # what the source initialisation keeps: the ResNet


def _config_test_sets(config: str) -> Tuple[str, ...]:
    from ..config import load_config

    return tuple(load_config(config).DATASETS.TEST)


class StudyRunner:
    """
    Args:
        study: the parsed study file.
        jobs: how many (arm, seed) runs go at once (default: the study file's ``jobs``). On the
            CPU each run gets ``cores // jobs`` threads (OMP_NUM_THREADS): more threads than cores
            make OpenMP's workers wait on each other, which slowed a toy fine-tuning step from
            1.2 s to 8.5 s on 2 shared cores.
        keep_checkpoints: keep the periodic ``model_XXXXXXX.pth`` of finished stages (by default
            only ``model_final.pth`` and the export stay).
        records_dir: where each run's records go as soon as it finishes
            (:func:`drcl2.study.records.sync_records`), e.g. a folder under git.
        log: where progress lines go.
    """

    def __init__(
        self,
        study: Study,
        jobs: Optional[int] = None,
        keep_checkpoints: bool = False,
        records_dir: Optional[str] = None,
        log=print,
    ):
        self.study = study
        self.records_dir = records_dir
        self.jobs = max(1, int(jobs if jobs is not None else study.jobs))
        self.keep_checkpoints = keep_checkpoints
        self.log = log
        self._lock = threading.Lock()
        self._device = None

    # -------------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        if self._device is None:
            if self.study.device == "auto":
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
            else:
                self._device = self.study.device
        return self._device

    def stage_dir(self, arm: Arm, seed: int, stage: Stage) -> str:
        return self.study.stage_dir(arm, seed, stage)

    def stage_weights(self, arm: Arm, seed: int, stage: Stage) -> Optional[str]:
        """MODEL.WEIGHTS of a stage, or None to keep its config's."""
        if stage.kind == "finetune" and arm.pretrain is not None:
            if stage.parts:
                return os.path.join(self.stage_dir(arm, seed, stage), PARTS_NAME)
            return os.path.join(self.stage_dir(arm, seed, arm.pretrain), EXPORT_NAME)
        if stage.weights == "source":
            return self.study.source_weights.output
        return None

    @staticmethod
    def schedule_opts(config: str, iters: int) -> List[str]:
        """``SOLVER.MAX_ITER`` ``iters``, with the config's learning-rate steps and warm-up
        stretched
        (or shrunk) from its ``SOLVER.MAX_ITER`` to that length."""
        from ..config import load_config

        cfg = load_config(config)
        scale = iters / cfg.SOLVER.MAX_ITER
        # (a one-iteration stage has no room for a step: detectron2 refuses a schedule with more
        # values than iterations)
        steps = tuple(sorted({min(max(1, round(s * scale)), iters - 1) for s in cfg.SOLVER.STEPS}))
        steps = steps if iters > 1 else ()
        return [
            "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", str(steps),
            "SOLVER.WARMUP_ITERS", str(min(cfg.SOLVER.WARMUP_ITERS, iters)),
        ]  # fmt: skip

    def stage_opts(self, arm: Arm, seed: int, stage: Stage) -> List[str]:
        """The overrides the study puts on top of the stage's config (then the arm's own opts)."""
        datasets = self.study.datasets
        names = ", ".join(f"'{datasets[split]}'" for split in self.study.splits)
        tests = f"({names},)" if stage.kind == "finetune" else "()"
        opts = [
            "OUTPUT_DIR", self.stage_dir(arm, seed, stage),
            "SEED", str(seed),
            "MODEL.DEVICE", self.device,
            "DATASETS.TRAIN", f"('{datasets['train']}',)",
            "DATASETS.TEST", tests,
            "TEST.EVAL_PERIOD", "0",
            *self.schedule_opts(stage.config, stage.iters),
            "SOLVER.CHECKPOINT_PERIOD", str(self.study.checkpoint_period),
        ]  # fmt: skip
        weights = self.stage_weights(arm, seed, stage)
        if weights is not None:
            opts += ["MODEL.WEIGHTS", weights]
        return opts + list(stage.opts)

    def stage_command(self, arm: Arm, seed: int, stage: Stage) -> List[str]:
        return [
            sys.executable, train_net_path(), "--config-file", stage.config,
            "--num-gpus", str(self.study.num_gpus), "--resume", *self.stage_opts(arm, seed, stage),
        ]  # fmt: skip

    # -------------------------------------------------------------------------------------------
    def seconds_per_iter(self) -> Dict[Tuple[str, str], float]:
        """Measured wall seconds per iteration (evaluation included) of finished stages, by
        (kind, config) and by kind (config ``"*"``)."""
        sums: Dict[Tuple[str, str], List[float]] = {}
        folders = {
            self.stage_dir(arm, seed, stage): stage
            for arm in self.study.arms.values()
            for seed in arm.seeds
            for stage in arm.stages
        }
        for folder, stage in folders.items():
            record = read_stage(folder)
            if record and record.get("wall_s"):
                for key in ((stage.kind, stage.config), (stage.kind, "*")):
                    total = sums.setdefault(key, [0.0, 0.0])
                    total[0] += record["wall_s"]
                    total[1] += stage.iters
        return {k: s / n for k, (s, n) in sums.items() if n}

    def estimate_s(self, stage: Stage, rates=None) -> float:
        rates = self.seconds_per_iter() if rates is None else rates
        rate = rates.get((stage.kind, stage.config)) or rates.get((stage.kind, "*"))
        return stage.iters * (rate or self.study.estimate_s_per_iter[stage.kind])

    def to_run(self, runs, arm: Arm, seed: int, stage: Stage) -> bool:
        """Whether a stage of ``runs`` must run: it has not finished, or it is a pre-training
        restored from records (:mod:`drcl2.study.records`, which keep no checkpoint) without its
        export while an unfinished fine-tuning of ``runs`` starts from that export."""
        folder = self.stage_dir(arm, seed, stage)
        if not stage_done(folder):
            return True
        if stage.kind != "pretrain" or os.path.isfile(os.path.join(folder, EXPORT_NAME)):
            return False
        return any(
            a.pretrain is not None
            and self.stage_dir(a, s, a.pretrain) == folder
            and not stage_done(self.stage_dir(a, s, a.finetune))
            for a, s in runs
        )

    def pending(self, runs) -> List[Tuple[Arm, int, Stage]]:
        """Stages of ``runs`` to run, each stage folder once (a reused pre-training runs
        once)."""
        seen, out = set(), []
        for arm, seed in runs:
            for stage in arm.stages:
                folder = self.stage_dir(arm, seed, stage)
                if folder not in seen and self.to_run(runs, arm, seed, stage):
                    seen.add(folder)
                    out.append((arm, seed, stage))
        return out

    def remaining_s(self, runs, rates=None) -> float:
        rates = self.seconds_per_iter() if rates is None else rates
        return sum(self.estimate_s(stage, rates) for _, _, stage in self.pending(runs)) / self.jobs

    def dry_run(self, runs) -> str:
        """What would run, with the estimated time (measured rates where stages have finished)."""
        rates = self.seconds_per_iter()
        lines = [
            f"Study '{self.study.name}' ({self.study.path}) -> {self.study.output_dir}, device "
            f"{self.device}, {self.study.num_gpus} GPU(s) per run, {self.jobs} run(s) at a time:"
        ]
        for i, (arm, seed) in enumerate(runs, 1):
            parts = []
            for stage in arm.stages:
                if stage.kind == "pretrain" and arm.pretrain_from:
                    parts.append(f"{arm.pretrain_from}'s pre-training")
                    continue
                state = (
                    "done"
                    if not self.to_run(runs, arm, seed, stage)
                    else (f"~{_minutes(self.estimate_s(stage, rates))} min")
                )
                parts.append(f"{LABELS[stage.kind]} {stage.iters} it ({stage.config}; {state})")
            lines.append(f"[{i}/{len(runs)}] {arm.name} seed {seed}: " + " -> ".join(parts))
        pending = self.pending(runs)
        source = self.study.source_weights
        if (
            source is not None
            and any(s.weights == "source" for _, _, s in pending)
            and not os.path.isfile(source.output)
        ):
            lines.append(
                f"first: source weights ({source.iters} it, {source.config}) -> {source.output}"
            )
        lines.append(
            f"{len(pending)} of {sum(len(a.stages) for a, _ in runs)} stages to run, "
            f"{sum(s.iters for _, _, s in pending):,} iterations; estimated "
            f"{_minutes(self.remaining_s(runs, rates))} min "
            + (
                "(from measured rates)"
                if rates
                else "(from estimate_s_per_iter: nothing has run yet)"
            )
        )
        return "\n".join(lines)

    # -------------------------------------------------------------------------------------------
    def source_dir(self) -> str:
        """Where the source detector trains: ``<output without .pth>_train/``."""
        return os.path.splitext(self.study.source_weights.output)[0] + "_train"

    def source_command(self) -> List[str]:
        source = self.study.source_weights
        return [
            sys.executable,
            train_net_path(),
            "--config-file",
            source.config,
            "--num-gpus",
            str(self.study.num_gpus),
            "--resume",
            "OUTPUT_DIR",
            self.source_dir(),
            "MODEL.DEVICE",
            self.device,
            "TEST.EVAL_PERIOD",
            "0",
            *self.schedule_opts(source.config, source.iters),
            "SOLVER.CHECKPOINT_PERIOD",
            str(self.study.checkpoint_period),
        ]

    def ensure_source_weights(self) -> None:
        """
        The source initialisation, the study's stand-in for ImageNet weights: train the source
        config's detector (its own datasets, evaluated on its ``DATASETS.TEST``) with every core,
        then keep only its ResNet (``backbone.bottom_up.*``) in ``source_weights.output``, as
        ImageNet weights initialise only the ResNet. Its command, wall time and accuracy go to
        ``source.json`` beside the weights (the report shows them). Resumable; done once per study.
        """
        source = self.study.source_weights
        if source is None or os.path.isfile(source.output):
            return
        out = self.source_dir()
        os.makedirs(out, exist_ok=True)
        self.log(
            f"source weights: supervised detection pre-training on the source set ({source.iters} "
            f"it, {source.config}) -> {source.output}"
        )
        cmd = self.source_command()
        wall = self._run(
            cmd,
            os.path.join(out, "stdout.log"),
            what="source pre-training",
            threads=os.cpu_count() or 1,
        )
        attempts_path = os.path.join(out, "study_attempts.json")
        attempts = (json.load(open(attempts_path)) if os.path.isfile(attempts_path) else []) + [
            wall
        ]
        _write_json(attempts_path, attempts)
        test_sets = _config_test_sets(source.config)
        results = finetune_results(out, {"val": test_sets[0]}, ("val",))["val"] if test_sets else {}
        export_parts(os.path.join(out, "model_final.pth"), source.output, [SOURCE_PART])
        record = {
            "config": source.config,
            "iters": source.iters,
            "command": cmd,
            "wall_s": sum(attempts),
            "device": self.device,
            "dataset": test_sets[0] if test_sets else None,
            "results": results,
        }
        _write_json(source_record_path(source.output), record)
        box = results.get("bbox", {})
        self.log(
            f"source weights ready in {sum(attempts) / 60:.1f} min; source {record['dataset']} box "
            f"AP {box.get('AP', float('nan')):.1f}"
        )

    def _run(
        self, cmd: List[str], log_path: str, what: str, threads: Optional[int] = None
    ) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.device == "cpu":
            threads = str(threads or max(1, (os.cpu_count() or 1) // self.jobs))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        start = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(
                f"{what} failed (exit code {code}); last lines of {log_path}:\n{tail}"
            )
        return time.perf_counter() - start

    def run_stage(self, arm: Arm, seed: int, stage: Stage) -> dict:
        """Run (or resume) one stage, export / record / prune it, and return its record."""
        out = self.stage_dir(arm, seed, stage)
        os.makedirs(out, exist_ok=True)
        if stage.parts:
            self._write_parts(arm, seed, stage)
        cmd = self.stage_command(arm, seed, stage)
        wall = self._run(
            cmd, os.path.join(out, "stdout.log"), what=f"{arm.name} seed {seed} {stage.kind}"
        )
        attempts_path = os.path.join(out, "study_attempts.json")
        attempts = json.load(open(attempts_path)) if os.path.isfile(attempts_path) else []
        attempts.append(wall)
        _write_json(attempts_path, attempts)
        record = {
            "arm": arm.name,
            "seed": seed,
            "stage": stage.kind,
            "config": stage.config,
            "iters": stage.iters,
            "command": cmd,
            "wall_s": sum(attempts),
            "device": self.device,
        }
        if stage.kind == "pretrain":
            export = os.path.join(out, EXPORT_NAME)
            if not os.path.isfile(
                export
            ):  # a detector pre-training: export the same parts as 2DRCL's
                export_finetune_weights(os.path.join(out, "model_final.pth"), export)
        else:
            record["results"] = finetune_results(out, self.study.datasets, self.study.splits)
        if not self.keep_checkpoints:
            for path in glob.glob(os.path.join(out, "model_[0-9]*.pth")):
                os.remove(path)  # periodic checkpoints of a finished stage; model_final.pth stays
        _write_json(os.path.join(out, STAGE_FILE), record)
        return record

    def _write_parts(self, arm: Arm, seed: int, stage: Stage) -> None:
        """The fine-tuning weights of ``stage``: the listed parts of the pre-training export."""
        export = os.path.join(self.stage_dir(arm, seed, arm.pretrain), EXPORT_NAME)
        export_parts(
            export, os.path.join(self.stage_dir(arm, seed, stage), PARTS_NAME), stage.parts
        )

    def run(self, runs) -> None:
        """Run every pending stage of ``runs`` ((arm, seed) pairs), ``jobs`` runs at a time."""
        if any(stage.weights == "source" for _, _, stage in self.pending(runs)):
            self.ensure_source_weights()
        todo = [(i, arm, seed) for i, (arm, seed) in enumerate(runs, 1)]
        total = len(runs)
        started = time.perf_counter()

        locks: Dict[str, threading.Lock] = {}

        def one(i, arm, seed):
            for stage in arm.stages:
                out = self.stage_dir(arm, seed, stage)
                with self._lock:
                    stage_lock = locks.setdefault(out, threading.Lock())
                with stage_lock:  # a reused pre-training runs once, whichever arm gets there first
                    self._one_stage(i, total, runs, arm, seed, stage)
            if self.records_dir:
                with self._lock:
                    saved, _ = sync_records(self.study, self.records_dir)
                    if saved:
                        self.log(f"records of {', '.join(saved)} kept in {self.records_dir}")

        self._dispatch(one, todo)
        self.log(
            f"study '{self.study.name}': {total} runs finished or skipped in "
            f"{(time.perf_counter() - started) / 60:.1f} min"
        )

    def _one_stage(self, i, total, runs, arm, seed, stage):
        folder = self.stage_dir(arm, seed, stage)
        if not self.to_run(runs, arm, seed, stage):
            return
        if stage_done(folder):  # restored from records without the export a fine-tuning needs
            self.log(
                f"[{i}/{total}] {arm.name} seed {seed}: the {LABELS[stage.kind]} record in "
                f"{folder} came without its export (records keep no checkpoint): running it again"
            )
            for name in (STAGE_FILE, "study_attempts.json"):
                os.remove(os.path.join(folder, name))  # the records keep the first ones
        with self._lock:
            eta = self.remaining_s(runs)
            self.log(
                f"[{i}/{total}] {arm.name} seed {seed}: {LABELS[stage.kind]} {stage.iters} it "
                f"... ETA {_minutes(eta)} min"
            )
        record = self.run_stage(arm, seed, stage)
        with self._lock:
            summary = ""
            if "results" in record:
                box = record["results"]["val"].get("bbox", {})
                nan = float("nan")
                summary = f"; val box AP {box.get('AP', nan):.1f}, APr {box.get('APr', nan):.1f}"
            self.log(
                f"[{i}/{total}] {arm.name} seed {seed}: {LABELS[stage.kind]} done in "
                f"{record['wall_s'] / 60:.1f} min{summary}"
            )

    def _dispatch(self, one, todo) -> None:
        if self.jobs == 1:
            for job in todo:
                one(*job)
            return
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = [pool.submit(one, *job) for job in todo]
            for f in concurrent.futures.as_completed(futures):
                if f.exception() is not None:
                    for other in futures:
                        other.cancel()  # stop scheduling; the running ones finish
                    raise f.exception()
