"""
A study's records: the small files of its finished runs, kept in a folder of their own (under git,
say) so that a study survives losing its output folder — a scratch disk wiped, a machine reset —
without keeping a single checkpoint.

``RECORDS/<arm>/seed<k>/<stage>/`` mirrors the output folder's stage folders and holds, per finished
stage, ``study_stage.json`` (command, wall time, evaluation results), ``study_attempts.json``, every
``inference/**/per_class_ap.csv`` and ``health.json`` (the last ``health/*`` figures of the stage's
``metrics.json``, when its health hook ran); ``RECORDS/source.json`` is the source
initialisation's record, ``RECORDS/<name>.study.yaml`` the study file as run and
``RECORDS/<name>.study_meta.json`` the study's commands.

:func:`sync_records` goes both ways and never overwrites a file: a finished run whose records are
missing from RECORDS is saved there; a run finished in RECORDS but not in the output folder is
restored to it, so the runner skips it and the report counts it. A restored pre-training that an
unfinished run still needs (another arm reusing it) runs again, as its export is not in the
records (:meth:`drcl2.study.runner.StudyRunner.to_run`).

The readers of those files live here too (:func:`read_stage`, :func:`read_source_record`,
:func:`invocations`), for the runner and the report.
"""

import glob
import json
import os
import shutil
from typing import List, Optional, Tuple

from .spec import Arm, Study

__all__ = [
    "sync_records",
    "last_health",
    "read_stage",
    "stage_done",
    "read_source_record",
    "source_record_path",
    "invocations",
    "STAGE_FILE",
    "HEALTH_FILE",
]

STAGE_FILE = "study_stage.json"  # what the runner writes in a stage folder once it has finished
HEALTH_FILE = "health.json"
_STAGE_FILES = (STAGE_FILE, "study_attempts.json", HEALTH_FILE)


def read_stage(stage_dir: str) -> Optional[dict]:
    """The ``study_stage.json`` record of a finished stage, or None."""
    path = os.path.join(stage_dir, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def stage_done(stage_dir: str) -> bool:
    return read_stage(stage_dir) is not None


def source_record_path(weights: str) -> str:
    """The ``source.json`` record beside the source weights."""
    return os.path.join(os.path.dirname(weights) or ".", "source.json")


def read_source_record(weights: str) -> Optional[dict]:
    path = source_record_path(weights)
    return json.load(open(path)) if os.path.isfile(path) else None


def invocations(meta: Optional[dict]) -> List[dict]:
    """The study commands recorded in ``<name>.study_meta.json``, oldest first (``{"invocations":
    [{"command", "commit", "device"}, ...]}``; a file of one bare invocation is read as a list of
    one)."""
    if not meta:
        return []
    return (
        list(meta["invocations"])
        if "invocations" in meta
        else [meta]
        if meta.get("command")
        else []
    )


def _stage_files(stage_dir: str) -> List[str]:
    """The record files of a stage folder, relative to it."""
    files = [f for f in _STAGE_FILES if os.path.isfile(os.path.join(stage_dir, f))]
    pattern = os.path.join(stage_dir, "inference", "**", "per_class_ap.csv")
    files += sorted(os.path.relpath(p, stage_dir) for p in glob.glob(pattern, recursive=True))
    return files


def last_health(metrics_path: str) -> dict:
    """The last ``health/*`` figures of a detectron2 ``metrics.json`` (one JSON record a line),
    with their iteration; {} when there are none."""
    last = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                record = json.loads(line)
                health = {k: v for k, v in record.items() if k.startswith("health/")}
                if health:
                    last = {"iteration": record.get("iteration"), **health}
    return last


def _copy_new(src_dir: str, dst_dir: str, files) -> int:
    """Copy ``files`` (relative) that ``dst_dir`` lacks; returns how many were copied."""
    copied = 0
    for rel in files:
        dst = os.path.join(dst_dir, rel)
        if os.path.exists(dst):
            continue  # never overwrite: the first record of a run is the one kept
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(src_dir, rel), dst)
        copied += 1
    return copied


def _finished(study: Study, root: str, arm: Arm, seed: int) -> bool:
    return all(
        os.path.isfile(os.path.join(_rebase(study, root, arm, seed, s), STAGE_FILE))
        for s in arm.stages
    )


def _rebase(study: Study, root: str, arm: Arm, seed: int, stage) -> str:
    """The folder of a stage under ``root`` (the output folder or the records)."""
    rel = os.path.relpath(study.stage_dir(arm, seed, stage), study.output_dir)
    return os.path.join(root, rel)


def sync_records(study: Study, records_dir: str) -> Tuple[List[str], List[str]]:
    """
    Save the finished runs of ``study`` that ``records_dir`` lacks and restore those that its
    output folder lacks (see the module doc). Returns the (saved, restored) runs as
    ``"<arm> seed <k>"``.
    """
    out = study.output_dir
    runs = [(arm, seed) for arm in study.arms.values() for seed in arm.seeds]
    saved, restored = [], []
    for arm, seed in runs:
        if not _finished(study, out, arm, seed):
            continue
        copied = 0
        for stage in arm.stages:
            src = study.stage_dir(arm, seed, stage)
            dst = _rebase(study, records_dir, arm, seed, stage)
            health_path = os.path.join(src, HEALTH_FILE)
            kept = os.path.isfile(os.path.join(dst, STAGE_FILE))  # then metrics.json is not read
            if not kept and not os.path.isfile(health_path):
                health = last_health(os.path.join(src, "metrics.json"))
                if health:
                    with open(health_path, "w") as f:
                        json.dump(health, f, indent=1, sort_keys=True)
            copied += _copy_new(src, dst, _stage_files(src))
        if copied:
            saved.append(f"{arm.name} seed {seed}")

    for arm, seed in runs:
        if _finished(study, out, arm, seed) or not _finished(study, records_dir, arm, seed):
            continue
        for stage in arm.stages:
            src = _rebase(study, records_dir, arm, seed, stage)
            _copy_new(src, study.stage_dir(arm, seed, stage), _stage_files(src))
        restored.append(f"{arm.name} seed {seed}")

    if study.source_weights is not None:  # the source initialisation's record
        here = source_record_path(study.source_weights.output)
        name = os.path.basename(here)
        if os.path.isfile(here):
            _copy_new(os.path.dirname(here), records_dir, [name])
        elif os.path.isfile(os.path.join(records_dir, name)):
            _copy_new(records_dir, os.path.dirname(here), [name])
    copy = f"{study.name}.study.yaml"  # the study file as run, which --summarize reads
    if os.path.isfile(os.path.join(out, copy)):
        _copy_new(out, records_dir, [copy])
    elif os.path.isfile(os.path.join(records_dir, copy)):
        _copy_new(records_dir, out, [copy])
    _merge_meta(
        os.path.join(out, f"{study.name}.study_meta.json"),
        os.path.join(records_dir, f"{study.name}.study_meta.json"),
    )
    return saved, restored


def _merge_meta(*paths: str) -> None:
    """Both files get every study command that either lists, the records' first."""
    merged = []
    for path in reversed(paths):  # the records' list, then the output's newer commands
        if os.path.isfile(path):
            with open(path) as f:
                merged += [r for r in invocations(json.load(f)) if r not in merged]
    if merged:
        for path in paths:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                json.dump({"invocations": merged}, f, indent=1)
