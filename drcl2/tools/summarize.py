"""
Print the LVIS results of a finished run as a table (AP, APr, APc, APf; boxes and masks) and where
its outputs are:

    python -m drcl2.tools.summarize OUTPUT_DIR [--study docs/study/toy/results.csv --arms
    scratch,2drcl] [--study docs/study/toy_init/results.csv --arms init,init_2drcl ...]

The figures are the last evaluation that detectron2's EvalHook logged to
``OUTPUT_DIR/metrics.json``. With ``--study``, the means over seeds of a committed study's arms
follow (box AP, val then test), so one run can be read against the seeded comparison; each
``--study`` takes the ``--arms`` given after it.
"""

import argparse
import json
import os
import sys
from typing import Dict

from tabulate import tabulate

__all__ = ["read_eval_metrics", "main"]

KEYS = ("AP", "AP50", "AP75", "APr", "APc", "APf")


def read_eval_metrics(output_dir: str) -> Dict[str, Dict[str, float]]:
    """
    The last evaluation results in ``output_dir/metrics.json``, as ``{task: {metric: value}}``
    (tasks such as "bbox" and "segm"). Raises ``FileNotFoundError`` / ``ValueError`` if the run
    logged none.
    """
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"'{path}' does not exist: is '{output_dir}' the OUTPUT_DIR of a run?"
        )
    last = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if any(key.endswith("/AP") for key in record):
                last = record
    if last is None:
        raise ValueError(
            f"'{path}' holds no evaluation results: the run had no DATASETS.TEST, or did not "
            "finish."
        )
    results: Dict[str, Dict[str, float]] = {}
    for key, value in last.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            results.setdefault(task, {})[metric] = value
    return results


def print_study_means(results_csv: str, arms) -> None:
    """Box AP of ``arms`` in a study's results.csv: mean ± std over seeds, val then test."""
    from ..study.report import mean_std, read_csv

    if not os.path.isfile(results_csv):
        print(f"\n(no study results at {results_csv}: run `make study` to make them)")
        return
    rows = read_csv(results_csv)
    for split in ("val", "test"):
        table = []
        for arm in arms:
            sel = [
                r for r in rows if r["arm"] == arm and r["split"] == split and r["task"] == "bbox"
            ]
            if not sel:
                continue
            cells = []
            for key in KEYS:
                m, sd, n = mean_std([float(r[key]) for r in sel])
                cells.append(f"{m:.2f}" if n < 2 else f"{m:.2f} ± {sd:.2f}")
            table.append(
                [arm, f"{sel[0]['iters']}", ", ".join(sorted(r["seed"] for r in sel)), *cells]
            )
        if table:
            print(
                f"\nThe committed study ({results_csv}), {split} split, box AP, mean ± std over "
                "seeds:"
            )
            print(
                tabulate(
                    table,
                    headers=["arm", "iterations", "seeds", *KEYS],
                    tablefmt="github",
                    disable_numparse=True,
                )
            )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.summarize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", help="OUTPUT_DIR of a training run")
    parser.add_argument(
        "--study",
        action="append",
        default=[],
        help="results.csv of a study report (python -m drcl2.tools.study); may be repeated",
    )
    parser.add_argument(
        "--arms",
        action="append",
        default=[],
        help="the arms to print of the --study before it (comma-separated)",
    )
    args = parser.parse_args(argv)
    if len(args.arms) != len(args.study):
        parser.error(
            f"give each --study its --arms ({len(args.study)} --study, {len(args.arms)} --arms)"
        )
    results = read_eval_metrics(args.output_dir)
    tasks = [t for t in ("bbox", "segm") if t in results]
    rows = [[t] + [results[t].get(k, float("nan")) for k in KEYS] for t in tasks]
    print(f"\nLVIS evaluation of {args.output_dir}:")
    print(tabulate(rows, headers=["task", *KEYS], floatfmt=".2f", tablefmt="github"))
    outputs = [
        ("final weights", "model_final.pth"),
        ("config", "config.yaml"),
        ("training log", "log.txt"),
        ("metrics (per iteration)", "metrics.json"),
        ("detections", os.path.join("inference", "lvis_instances_results.json")),
        ("per-class AP", os.path.join("inference", "per_class_ap.csv")),
        ("per-class AP plot", os.path.join("inference", "per_class_ap.png")),
    ]
    for study, arms in zip(args.study, args.arms):
        print_study_means(study, [a for a in arms.split(",") if a])
    print("\nOutputs:")
    for what, rel in outputs:
        path = os.path.join(args.output_dir, rel)
        if os.path.exists(path):
            print(f"  {what:<24} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
