"""
The study file: which arms, seeds, datasets and schedules a study runs (``configs/study/*.yaml``).

A study file is YAML with these keys (this docstring is the format's reference)::

    name: toy                          # a label for the report
    output_dir: output/study/toy       # runs land in OUTPUT_DIR/<arm>/seed<k>/{pretrain,finetune}
    num_gpus: 1                        # train_net.py --num-gpus of every run
    jobs: 1                            # runs at a time; on CPU each gets cores // jobs threads
    device: auto                       # MODEL.DEVICE: cpu, cuda, or auto (cuda when available)
    seeds: [1, 2, 3]                   # SEED of every run: initialisation and data order
    datasets:                          # fixed across arms and seeds
      train: lvis_v1_toy_train
      val: lvis_v1_toy_val             # choose and tune on this split ...
      test: lvis_v1_toy_test           # ... report this one; nothing is tuned on it (a study that
                                       # only explores, on val, leaves test out)
    schedule: {P: 500, F: 500}         # named iteration counts, used by the stages' `iters`
    checkpoint_period: 100             # SOLVER.CHECKPOINT_PERIOD (an interrupted run resumes there)
    estimate_s_per_iter: {pretrain: 0.6, finetune: 0.5}   # --dry-run's ETA before anything ran
    source_weights:                    # optional: the weights that `weights: source` stages start
                                       from
      config: configs/toy/Base-RCNN-FPN-R18.yaml
      output: output/study/source/r18_source.pth
      iters: 3000
    arms:
      scratch:
        group: main                    # arms are grouped in the report (main, ablation, init, ...)
        finetune: {config: configs/toy/mask_rcnn_finetune.yaml, iters: F}
      2drcl:
        group: main
        pretrain: {config: configs/toy/pretrain_2drcl.yaml, iters: P, opts: [KEY, VALUE, ...]}
        finetune: {config: configs/toy/mask_rcnn_finetune.yaml, iters: F}
        compare_to: [scratch]          # paired differences in the report
        seeds: [1]                     # optional: fewer (or other) seeds than the study's
      2drcl_backbone:
        pretrain: {from: 2drcl}        # the pre-training runs of another arm (same seeds), not
                                       again
        finetune: {config: configs/toy/mask_rcnn_finetune.yaml, iters: F, parts: [backbone]}

``iters`` is a number or a sum of names from ``schedule`` (``F + P``). The stage's learning-rate
steps and warm-up are scaled from its config's ``SOLVER.MAX_ITER`` to ``iters``. ``weights:
source`` (on the first stage of an arm) starts it from ``source_weights``; otherwise a
fine-tuning stage after a pre-training stage starts from its export
(``model_final_finetune.pth``) — or from the listed ``parts`` of it (``backbone``,
``proposal_generator``, ``roi_heads.box_head``) — and a lone stage from its config's
``MODEL.WEIGHTS``.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

__all__ = ["Stage", "Arm", "SourceWeights", "Study", "load_study", "StudyFileError"]

STAGES = ("pretrain", "finetune")
DEVICES = ("cpu", "cuda", "auto")
_STUDY_KEYS = {
    "name",
    "output_dir",
    "num_gpus",
    "jobs",
    "device",
    "seeds",
    "datasets",
    "schedule",
    "checkpoint_period",
    "estimate_s_per_iter",
    "source_weights",
    "arms",
    "per_class_delta",
}
_ARM_KEYS = {"group", "pretrain", "finetune", "compare_to", "seeds"}
_STAGE_KEYS = {"config", "iters", "opts", "weights", "parts"}
PARTS = ("backbone", "proposal_generator", "roi_heads.box_head")  # what an export holds


class StudyFileError(ValueError):
    """A study file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Stage:
    """One training run of an arm: a config, its length and overrides."""

    kind: str  # "pretrain" or "finetune"
    config: str  # path of the detectron2 config
    iters: int
    opts: Tuple[str, ...] = ()
    weights: Optional[str] = None  # "source": start from the study's source weights
    parts: Tuple[str, ...] = ()  # fine-tuning: start from these parts of the export only


@dataclass(frozen=True)
class Arm:
    """A row of the study: an optional pre-training stage, then fine-tuning, for each seed."""

    name: str
    group: str
    finetune: Stage
    pretrain: Optional[Stage] = None
    seeds: Tuple[int, ...] = ()
    compare_to: Tuple[str, ...] = ()
    pretrain_from: Optional[str] = None  # the arm whose pre-training runs this arm reuses

    @property
    def stages(self) -> List[Stage]:
        return [s for s in (self.pretrain, self.finetune) if s is not None]

    @property
    def iters(self) -> int:
        """Training iterations of one seed, all stages (the study's unit of compute)."""
        return sum(s.iters for s in self.stages)


@dataclass(frozen=True)
class SourceWeights:
    """Supervised pre-training on the generated source set (the toy stand-in for ImageNet)."""

    config: str
    output: str
    iters: int


@dataclass(frozen=True)
class Study:
    path: str
    name: str
    output_dir: str
    num_gpus: int
    jobs: int
    device: str
    seeds: Tuple[int, ...]
    datasets: Dict[str, str]
    schedule: Dict[str, int]
    checkpoint_period: int
    estimate_s_per_iter: Dict[str, float]
    arms: Dict[str, Arm]
    source_weights: Optional[SourceWeights] = None
    per_class_delta: Tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def stage_dir(self, arm: Arm, seed: int, stage: Stage) -> str:
        """The folder of ``stage`` of ``arm`` (a reused pre-training: the other arm's)."""
        owner = arm.pretrain_from if stage.kind == "pretrain" and arm.pretrain_from else arm.name
        return self.run_dir(owner, seed, stage.kind)

    @property
    def splits(self) -> Tuple[str, ...]:
        """The evaluated splits: val, and test unless the study leaves it out."""
        return ("val", "test") if self.datasets.get("test") else ("val",)

    def runs(self, arms: Optional[List[str]] = None, seeds: Optional[List[int]] = None):
        """
        (arm, seed) pairs in the order they run: group by group (in the order the study file
        lists them), seed-major inside a group, so the first results cover every arm of the first
        group (the main arms) and the main comparison is complete before the ablations start.
        """
        chosen = [self.arms[a] for a in (arms or self.arms)]
        groups = list(dict.fromkeys(arm.group for arm in chosen))
        return [
            (arm, seed)
            for group in groups
            for seed in sorted({s for arm in chosen if arm.group == group for s in arm.seeds})
            if seeds is None or seed in seeds
            for arm in chosen
            if arm.group == group and seed in arm.seeds
        ]

    def run_dir(self, arm: str, seed: int, stage: str) -> str:
        return os.path.join(self.output_dir, arm, f"seed{seed}", stage)


def _fail(path, key, msg):
    raise StudyFileError(f"{path}: {key}: {msg}")


def _unknown_keys(path, where, given, allowed):
    extra = sorted(set(given) - allowed)
    if extra:
        _fail(path, where, f"unknown key(s) {extra}; allowed: {sorted(allowed)}.")


def _resolve(path, key, file, study_dir):
    """A config path as written (relative to the working directory), else relative to the study
    file."""
    if not isinstance(file, str) or not file:
        _fail(path, key, f"must be a path to a config file; got {file!r}.")
    for candidate in (file, os.path.join(study_dir, file)):
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    _fail(
        path,
        key,
        f"config file '{file}' not found (looked in the working directory and next to the study "
        "file).",
    )


def _iters(path, key, value, schedule):
    if isinstance(value, bool):
        _fail(
            path, key, f"must be a number of iterations or a sum of schedule names; got {value!r}."
        )
    if isinstance(value, int):
        total = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[\w]+(\s*\+\s*[\w]+)*\s*", value):
        total = 0
        for term in (t.strip() for t in value.split("+")):
            if term.isdigit():
                total += int(term)
            elif term in schedule:
                total += schedule[term]
            else:
                _fail(
                    path,
                    key,
                    f"'{term}' is neither a number nor a name in schedule {sorted(schedule)}.",
                )
    else:
        _fail(path, key, f"must be a number of iterations or a sum like 'F + P'; got {value!r}.")
    if total < 1:
        _fail(path, key, f"must be at least 1 iteration; got {total}.")
    return total


def _stage(path, where, kind, raw, schedule, study_dir):
    if not isinstance(raw, dict):
        _fail(path, where, f"must be a mapping with keys {sorted(_STAGE_KEYS)}; got {raw!r}.")
    _unknown_keys(path, where, raw, _STAGE_KEYS)
    if "config" not in raw or "iters" not in raw:
        _fail(path, where, "needs 'config' and 'iters'.")
    opts = raw.get("opts") or []
    if not isinstance(opts, list) or len(opts) % 2:
        _fail(
            path,
            f"{where}.opts",
            f"must be a list of KEY, VALUE pairs (even length); got {opts!r}.",
        )
    weights = raw.get("weights")
    if weights not in (None, "source"):
        _fail(
            path,
            f"{where}.weights",
            f"must be 'source' (the study's source_weights) or absent; got {weights!r}.",
        )
    parts = raw.get("parts") or []
    if kind != "finetune" and parts:
        _fail(path, f"{where}.parts", "only a fine-tuning stage chooses parts of an export.")
    if not isinstance(parts, list) or not set(parts) <= set(PARTS) or len(set(parts)) != len(parts):
        _fail(
            path, f"{where}.parts", f"must list distinct parts among {list(PARTS)}; got {parts!r}."
        )
    return Stage(
        kind=kind,
        config=_resolve(path, f"{where}.config", raw["config"], study_dir),
        iters=_iters(path, f"{where}.iters", raw["iters"], schedule),
        opts=tuple(str(o) for o in opts),
        weights=weights,
        parts=tuple(parts),
    )


def _seeds(path, key, raw):
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw)
    ):
        _fail(path, key, f"must be a non-empty list of integers; got {raw!r}.")
    if len(set(raw)) != len(raw):
        _fail(path, key, f"has repeated seeds: {raw}.")
    return tuple(raw)


def load_study(path: str, output_dir: Optional[str] = None) -> Study:
    """
    Parse and check a study file. Raises :class:`StudyFileError` naming the file and the key for
    anything that cannot run: unknown keys, missing configs, bad schedules, unknown arms.
    """
    if not os.path.isfile(path):
        raise StudyFileError(f"{path}: study file not found.")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise StudyFileError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise StudyFileError(f"{path}: a study file is a YAML mapping; got {type(raw).__name__}.")
    _unknown_keys(path, "(top level)", raw, _STUDY_KEYS)
    for key in ("name", "output_dir", "seeds", "datasets", "arms"):
        if key not in raw:
            _fail(path, key, "missing.")
    study_dir = os.path.dirname(os.path.abspath(path))

    schedule = raw.get("schedule") or {}
    if not isinstance(schedule, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in schedule.items()
    ):
        _fail(path, "schedule", f"must map names to positive iteration counts; got {schedule!r}.")
    datasets = raw["datasets"]
    if not isinstance(datasets, dict) or not {"train", "val"} <= set(datasets) <= {
        "train",
        "val",
        "test",
    }:
        _fail(
            path,
            "datasets",
            f"must name train, val and (unless the study only explores) test; got {datasets!r}.",
        )
    datasets.setdefault("test", None)
    device = raw.get("device", "auto")
    if device not in DEVICES:
        _fail(path, "device", f"must be one of {DEVICES}; got {device!r}.")
    num_gpus = raw.get("num_gpus", 1)
    if not isinstance(num_gpus, int) or num_gpus < 1:
        _fail(path, "num_gpus", f"must be an integer >= 1; got {num_gpus!r}.")
    jobs = raw.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        _fail(path, "jobs", f"must be an integer >= 1; got {jobs!r}.")
    period = raw.get("checkpoint_period", 100)
    if not isinstance(period, int) or period < 1:
        _fail(path, "checkpoint_period", f"must be an integer >= 1; got {period!r}.")
    estimate = {"pretrain": 1.0, "finetune": 1.0}
    estimate.update(raw.get("estimate_s_per_iter") or {})
    if set(estimate) != set(STAGES) or not all(
        isinstance(v, (int, float)) and v > 0 for v in estimate.values()
    ):
        _fail(
            path,
            "estimate_s_per_iter",
            f"must give positive seconds for {list(STAGES)}; got {estimate!r}.",
        )
    seeds = _seeds(path, "seeds", raw["seeds"])

    source = None
    if raw.get("source_weights") is not None:
        sw = raw["source_weights"]
        if not isinstance(sw, dict) or set(sw) != {"config", "output", "iters"}:
            _fail(
                path, "source_weights", f"must have exactly config, output and iters; got {sw!r}."
            )
        source = SourceWeights(
            config=_resolve(path, "source_weights.config", sw["config"], study_dir),
            output=str(sw["output"]),
            iters=_iters(path, "source_weights.iters", sw["iters"], schedule),
        )

    if not isinstance(raw["arms"], dict) or not raw["arms"]:
        _fail(path, "arms", "must map arm names to arms (at least one).")
    arms = {}
    for name, spec in raw["arms"].items():
        where = f"arms.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
            _fail(path, where, "arm names are letters, digits, '_' and '-' (they name folders).")
        if not isinstance(spec, dict):
            _fail(path, where, f"must be a mapping; got {spec!r}.")
        _unknown_keys(path, where, spec, _ARM_KEYS)
        if "finetune" not in spec:
            _fail(
                path,
                where,
                "needs a 'finetune' stage (every arm ends in fine-tuning + evaluation).",
            )
        pretrain, pretrain_from = spec.get("pretrain"), None
        if isinstance(pretrain, dict) and "from" in pretrain:
            if set(pretrain) != {"from"}:
                _fail(
                    path,
                    f"{where}.pretrain",
                    "a reused pre-training ({from: ARM}) takes no other key.",
                )
            pretrain_from = str(pretrain["from"])
            pretrain = None  # filled in below, once every arm is parsed
        elif pretrain is not None:
            pretrain = _stage(path, f"{where}.pretrain", "pretrain", pretrain, schedule, study_dir)
        finetune = _stage(
            path, f"{where}.finetune", "finetune", spec["finetune"], schedule, study_dir
        )
        if finetune.parts and pretrain is None and pretrain_from is None:
            _fail(
                path,
                f"{where}.finetune.parts",
                "needs a pre-training stage whose export it takes parts of.",
            )
        if pretrain is not None and finetune.weights is not None:
            _fail(
                path,
                f"{where}.finetune.weights",
                "a fine-tuning stage after pre-training starts from its export.",
            )
        if (pretrain or finetune).weights == "source" and source is None:
            _fail(path, where, "starts from 'source' weights but the study has no source_weights.")
        arms[str(name)] = Arm(
            name=str(name),
            group=str(spec.get("group", "main")),
            pretrain=pretrain,
            finetune=finetune,
            seeds=_seeds(path, f"{where}.seeds", spec["seeds"]) if "seeds" in spec else seeds,
            compare_to=tuple(spec.get("compare_to") or ()),
            pretrain_from=pretrain_from,
        )
    for name, arm in list(arms.items()):
        if arm.pretrain_from is None:
            continue
        source_arm = arms.get(arm.pretrain_from)
        if (
            source_arm is None
            or source_arm.pretrain is None
            or source_arm.pretrain_from is not None
        ):
            _fail(
                path,
                f"arms.{name}.pretrain.from",
                f"'{arm.pretrain_from}' is not an arm with its own pre-training.",
            )
        if not set(arm.seeds) <= set(source_arm.seeds):
            _fail(
                path,
                f"arms.{name}.seeds",
                f"seeds {list(arm.seeds)} must be among those of '{arm.pretrain_from}'.",
            )
        arms[name] = dataclasses.replace(arm, pretrain=source_arm.pretrain)
    for arm in arms.values():
        for other in arm.compare_to:
            if other not in arms or other == arm.name:
                _fail(
                    path,
                    f"arms.{arm.name}.compare_to",
                    f"'{other}' is not another arm of the study.",
                )
    per_class = tuple(raw.get("per_class_delta") or ())
    for name in per_class:
        if name not in arms or not arms[name].compare_to:
            _fail(path, "per_class_delta", f"'{name}' must be an arm with compare_to.")

    return Study(
        path=path,
        name=str(raw["name"]),
        output_dir=output_dir or str(raw["output_dir"]),
        num_gpus=num_gpus,
        jobs=jobs,
        device=device,
        seeds=seeds,
        datasets=dict(datasets),
        schedule=dict(schedule),
        checkpoint_period=period,
        estimate_s_per_iter={k: float(v) for k, v in estimate.items()},
        arms=arms,
        source_weights=source,
        per_class_delta=per_class,
        raw=raw,
    )
