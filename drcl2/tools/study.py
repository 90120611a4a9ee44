"""
Run a seeded long-tail study (arms x seeds; pre-train -> export -> fine-tune -> LVIS evaluation on
val and test) and write its report:

    python -m drcl2.tools.study --config-file configs/study/toy.yaml [--dry-run]
        [--arms scratch,2drcl] [--seeds 1,2] [--jobs 2] [--report-dir docs/study/toy]
    python -m drcl2.tools.study --summarize output/study/toy [--name toy] [--report-dir DIR]
    [--probe 1]
    ... --records docs/study/toy_init/runs   (either form)

Runs land in OUTPUT_DIR/<arm>/seed<k>/{pretrain,finetune} (OUTPUT_DIR from the study file or
--output-dir). Finished runs are skipped, interrupted ones resume from their last checkpoint, so the
same command continues a study. The report (results.csv, per_class.csv, summary.md, groups.png,
per_class_delta.png) goes to --report-dir (default OUTPUT_DIR/report_<name>) after the runs, and
--summarize rebuilds it from whatever has finished (several studies may share an OUTPUT_DIR and
its finished runs, e.g. an exploration beside the main study: --name picks one). See
drcl2/study/spec.py for the study file. --probe SEED also probes every arm's exported weights of
that seed before fine-tuning (python -m drcl2.tools.probe; probe.csv / probe.md in the report, whose
summary.md then shows the table).

--records DIR keeps the small files of every finished run (records, per-class AP, health
figures; no checkpoint) in DIR as soon as it finishes, and first restores the finished runs that
DIR holds and OUTPUT_DIR lacks: with DIR under git, a study goes on after its output folder is
lost, and the report is rebuilt from DIR alone (drcl2/study/records.py).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

__all__ = ["main"]


def _device_description(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}, no GPU"


def _commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def _study_copy(output_dir: str, name=None, records=None) -> str:
    """The study file that a run left in ``output_dir`` (``<name>.study.yaml``), or else in the
    ``records`` folder."""
    from ..study import StudyFileError

    for folder in (output_dir, records):
        found = (
            sorted(
                f[: -len(".study.yaml")] for f in os.listdir(folder) if f.endswith(".study.yaml")
            )
            if folder and os.path.isdir(folder)
            else []
        )
        if found:
            break
    if name is None and len(found) == 1:
        name = found[0]
    if name is None or name not in found:
        raise StudyFileError(
            f"{output_dir}: "
            + (f"no study named '{name}'; " if name else "")
            + (
                f"it holds the studies {found}: choose one with --name."
                if found
                else "no <name>.study.yaml here"
                + (f" nor in {records}" if records else "")
                + ": is it the output_dir of a study run?"
            )
        )
    return os.path.join(folder, f"{name}.study.yaml")


def _probe(study, report_dir: str, seed: int, max_images: int) -> None:
    import drcl2  # noqa: F401  (registers the datasets)

    from .probe import probe_study_exports

    print(
        probe_study_exports(
            study, report_dir, seed, max_train_images=2 * max_images, max_images=max_images
        )
    )


def _int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config-file", help="the study file (e.g. configs/study/toy.yaml)")
    what.add_argument(
        "--summarize", metavar="OUTPUT_DIR", help="rebuild the report of a study's finished runs"
    )
    parser.add_argument(
        "--output-dir", help="where the runs go (default: the study file's output_dir)"
    )
    parser.add_argument(
        "--name", help="with --summarize: which study of OUTPUT_DIR (when it holds several)"
    )
    parser.add_argument(
        "--report-dir", help="where the report goes (default: OUTPUT_DIR/report_<study name>)"
    )
    parser.add_argument("--arms", help="comma-separated arms to run (default: all)")
    parser.add_argument(
        "--seeds", type=_int_list, help="comma-separated seeds to run (default: the study's)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time (default: the study file's jobs; CPU: cores are shared out)",
    )
    parser.add_argument(
        "--records",
        metavar="DIR",
        help="keep each finished run's records in DIR and restore from it, before anything else "
        "(a --dry-run too; see above)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs and the estimated time; train nothing"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep periodic checkpoints of finished stages",
    )
    parser.add_argument(
        "--probe",
        type=int,
        metavar="SEED",
        default=None,
        help="probe the exported weights of this seed into the report (drcl2.tools.probe)",
    )
    parser.add_argument(
        "--probe-max-images",
        type=int,
        default=1000,
        help="val images the probe scores (twice as many training images train it)",
    )
    args = parser.parse_args(argv)

    from ..study import StudyFileError, StudyRunner, load_study, write_report
    from ..study.records import invocations

    try:
        if args.summarize:
            study = load_study(
                _study_copy(args.summarize, args.name, args.records), output_dir=args.summarize
            )
        else:
            study = load_study(args.config_file, output_dir=args.output_dir)
        arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
        for a in arms or ():
            if a not in study.arms:
                raise StudyFileError(
                    f"--arms: '{a}' is not an arm of {study.path} (arms: {', '.join(study.arms)})."
                )
    except StudyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_dir = args.report_dir or os.path.join(study.output_dir, f"report_{study.name}")
    meta_path = os.path.join(study.output_dir, f"{study.name}.study_meta.json")

    if args.records:
        from ..study.records import sync_records

        saved, restored = sync_records(study, args.records)
        for what, runs in (("restored from", restored), ("kept in", saved)):
            if runs:
                print(f"records of {', '.join(runs)} {what} {args.records}")
    if args.summarize:
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        if args.probe is not None:
            _probe(study, report_dir, args.probe, args.probe_max_images)
        paths = write_report(study, report_dir, meta)
        print(open(paths["summary.md"]).read())
        print(f"report: {report_dir}")
        return 0

    runner = StudyRunner(
        study, jobs=args.jobs, keep_checkpoints=args.keep_checkpoints, records_dir=args.records
    )
    runs = study.runs(arms, args.seeds)
    if not runs:
        print("error: no (arm, seed) runs selected.", file=sys.stderr)
        return 2
    print(runner.dry_run(runs))
    if args.dry_run:
        return 0
    os.makedirs(study.output_dir, exist_ok=True)
    copy = os.path.join(study.output_dir, f"{study.name}.study.yaml")
    if os.path.abspath(study.path) != os.path.abspath(copy):
        shutil.copyfile(study.path, copy)  # for --summarize
    command = "python -m drcl2.tools.study " + " ".join(sys.argv[1:] if argv is None else argv)
    # a study may be trained by several commands (arms added later, a resumed run): keep them all
    meta = {
        "invocations": invocations(
            json.load(open(meta_path)) if os.path.isfile(meta_path) else None
        )
    }
    meta["invocations"].append(
        {"command": command, "commit": _commit(), "device": _device_description(runner.device)}
    )
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    try:
        runner.run(runs)
        if args.probe is not None:
            _probe(study, report_dir, args.probe, args.probe_max_images)
    finally:
        paths = write_report(study, report_dir, meta)
        print(
            f"report: {report_dir} "
            f"({', '.join(sorted(os.path.basename(p) for p in paths.values()))})"
        )
    print(open(paths["summary.md"]).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
