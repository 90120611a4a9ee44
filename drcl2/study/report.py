"""
The study report, rebuilt from finished runs at any time:

* ``results.csv``: one row per (arm, seed, split, task) — AP, AP50, AP75, APr, APc, APf, the
  arm's training iterations and wall seconds;
* ``per_class.csv``: per-class box and mask AP of every finished run, with the class's frequency
  group and training image count;
* ``summary.md``: mean ± std over seeds per arm, and the paired difference (same seed) of each arm
  against the arms it is compared to, on the held-out test split (val, used for choices, after);
* ``groups.png``: test APr / APc / APf per arm, with the std over seeds as error bars;
* ``per_class_delta.png``: per-class test box AP of an arm minus its best baseline (mean over
  seeds) against training images per class.

Everything here is plain maths on rows (dicts), so it can be tested on hand-made CSVs.
"""

import csv
import math
import os
import statistics
from typing import Dict, Iterable, List, Optional, Sequence

from ..checkpoint import atomic_write
from .records import invocations, read_source_record, read_stage

__all__ = [
    "METRICS", "RESULT_COLUMNS", "PER_CLASS_COLUMNS", "collect_rows", "write_csv", "read_csv",
    "mean_std", "paired_differences", "summary_markdown", "plot_groups", "plot_per_class_delta",
    "write_report",
]  # fmt: skip

METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf")
RESULT_COLUMNS = ("arm", "group", "seed", "split", "task", *METRICS, "iters", "wall_s")
PER_CLASS_COLUMNS = (
    "arm",
    "seed",
    "split",
    "class",
    "frequency_group",
    "train_image_count",
    "ap_box",
    "ap_mask",
)
GROUP_LABELS = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_COLOURS = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def collect_rows(study):
    """
    (results rows, per-class rows) of every finished (arm, seed) of ``study`` (a
    :class:`drcl2.study.spec.Study`); unfinished runs are left out.
    """
    from .runner import inference_dir

    rows, per_class = [], []
    for arm in study.arms.values():
        for seed in arm.seeds:
            records = [read_stage(study.stage_dir(arm, seed, s)) for s in arm.stages]
            if any(r is None for r in records):
                continue
            wall = sum(r["wall_s"] for r in records)
            for split, tasks in records[-1]["results"].items():
                if split not in study.splits:
                    continue  # a run shared with a study that also evaluates other splits
                for task, metrics in tasks.items():
                    row = {
                        "arm": arm.name,
                        "group": arm.group,
                        "seed": seed,
                        "split": split,
                        "task": task,
                        "iters": arm.iters,
                        "wall_s": round(wall, 1),
                    }
                    row.update({m: metrics.get(m, float("nan")) for m in METRICS})
                    rows.append(row)
                folder = inference_dir(
                    study.stage_dir(arm, seed, arm.finetune),
                    study.datasets[split],
                    len(study.splits),
                )
                path = os.path.join(folder, "per_class_ap.csv")
                if os.path.isfile(path):
                    for r in read_csv(path):
                        per_class.append(
                            {
                                "arm": arm.name,
                                "seed": seed,
                                "split": split,
                                **{k: r.get(k, "") for k in PER_CLASS_COLUMNS[3:]},
                            }
                        )
    return rows, per_class


def write_csv(path: str, rows: Iterable[dict], columns: Sequence[str]) -> None:
    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: (f"{v:.4f}" if isinstance(v, float) and k in METRICS else v)
                    for k, v in row.items()
                }
            )

    atomic_write(path, write, mode="w")


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _value(row, metric) -> float:
    try:
        return float(row[metric])
    except (TypeError, ValueError):
        return float("nan")


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]):
    """(mean, sample standard deviation (n - 1), n) of the finite values; std is nan for n < 2."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.fmean(values), std, len(values)


def _select(rows, arm, split, task):
    return {
        int(r["seed"]): r
        for r in rows
        if r["arm"] == arm and r["split"] == split and r["task"] == task
    }


def paired_differences(
    rows, arm: str, baseline: str, split: str, task: str, metric: str
) -> List[float]:
    """``metric`` of ``arm`` minus ``baseline``, seed by seed, for the seeds both have finished."""
    a, b = _select(rows, arm, split, task), _select(rows, baseline, split, task)
    return [_value(a[s], metric) - _value(b[s], metric) for s in sorted(set(a) & set(b))]


def _fmt(mean, std, n, signed=False):
    if n == 0:
        return "–"
    m = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return m if n < 2 else f"{m} ± {std:.1f}"


def _verdict(diffs) -> str:
    mean, std, n = mean_std(diffs)
    if n < 2:
        return "one seed: no verdict"
    if mean > std:
        return "gain > std"
    if -mean > std:
        return "loss > std"
    return "within noise"


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def _arm_table(rows, arms, split, task):
    lines = [
        "| arm | group | iterations | seeds | AP | AP50 | APr | APc | APf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        sel = _select(rows, arm.name, split, task)
        if not sel:
            continue
        cells = [
            _fmt(*mean_std([_value(r, m) for r in sel.values()]))
            for m in ("AP", "AP50", "APr", "APc", "APf")
        ]
        seeds = ", ".join(str(s) for s in sorted(sel))
        lines.append(
            f"| {arm.name} | {arm.group} | {arm.iters} | {seeds} | " + " | ".join(cells) + " |"
        )
    return lines


def _paired_table(rows, arms, split, task):
    lines = [
        "| arm | baseline | pairs | ΔAP | ΔAPr | ΔAPc | ΔAPf | APr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for baseline in arm.compare_to:
            diffs = {
                m: paired_differences(rows, arm.name, baseline, split, task, m)
                for m in ("AP", "APr", "APc", "APf")
            }
            n = len(diffs["AP"])
            if n == 0:
                continue
            cells = [_fmt(*mean_std(diffs[m]), signed=True) for m in ("AP", "APr", "APc", "APf")]
            lines.append(
                f"| {arm.name} | {baseline} | {n} | "
                + " | ".join(cells)
                + f" | {_verdict(diffs['APr'])} |"
            )
    return lines


def _source_lines(study) -> List[str]:
    """The source initialisation's own accuracy and cost (``source.json``), when the study has
    one."""
    source = study.source_weights
    record = read_source_record(source.output) if source is not None else None
    if record is None:
        return []
    box, mask = record["results"].get("bbox", {}), record["results"].get("segm", {})
    return [
        f"- source initialisation: `{record['config']}`, {record['iters']:,} iterations, "
        f"{record['wall_s'] / 60:.0f} min on {record['device']}; on its own `{record['dataset']}`: "
        f"box AP {box.get('AP', float('nan')):.1f} (AP50 {box.get('AP50', float('nan')):.1f}), "
        f"mask AP {mask.get('AP', float('nan')):.1f}; its ResNet (`backbone.bottom_up.*`) starts "
        "the `weights: source` stages"
    ]


def summary_markdown(study, rows, meta: Optional[dict] = None) -> str:
    """The report's ``summary.md``: tables of means and paired differences (see module doc)."""
    arms = list(study.arms.values())
    d = study.datasets
    out = [f"# Study `{study.name}`", ""]
    for run in invocations(meta):  # every command that trained runs into this output folder
        out.append(
            f"- `{run['command']}` at commit {run.get('commit', '?')} on {run.get('device', '?')}"
        )
    out.append(
        f"- splits: train `{d['train']}`; val `{d['val']}` (choices and tuning); "
        + (
            f"test `{d['test']}` (held out, reported)"
            if d.get("test")
            else "no test split (an exploration on val)"
        )
    )
    out.append(
        f"- schedule: {', '.join(f'{k} = {v}' for k, v in study.schedule.items())} iterations; "
        f"iterations per arm and seed in the tables"
    )
    seeds = sorted({int(r["seed"]) for r in rows})
    wall = sum(float(r["wall_s"]) for r in rows if r["split"] == "val" and r["task"] == "bbox")
    out.append(
        f"- finished runs: {len({(r['arm'], r['seed']) for r in rows})} (seeds {seeds}); "
        f"their wall time adds up to {wall / 60:.0f} min"
    )
    out.append(
        "- mean ± sample std over seeds; Δ = arm − baseline on the same seed, mean ± std over "
        "seeds; APr verdict: 'gain > std' when mean ΔAPr exceeds its std"
    )
    out += _source_lines(study)
    out.append("")
    for split, title in (
        ("test", "Test split (held out)"),
        ("val", "Val split (used for choices)"),
    ):
        for task, name in (("bbox", "box"), ("segm", "mask")):
            table = _arm_table(rows, arms, split, task)
            if len(table) > 2:
                out += [f"## {title}: {name} AP", "", *table, ""]
        paired = _paired_table(rows, arms, split, "bbox")
        if len(paired) > 2:
            out += [f"## {title}: paired differences, box AP", "", *paired, ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_groups(
    rows, arms: Sequence[str], path: str, split: str = "test", task: str = "bbox"
) -> None:
    """APr / APc / APf per arm (bars: mean over seeds, error bars: std)."""
    plt = _pyplot()
    arms = [a for a in arms if _select(rows, a, split, task)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(arms) + 2), 4.0))
    width = 0.26
    for k, (metric, group) in enumerate((("APr", "r"), ("APc", "c"), ("APf", "f"))):
        stats = [
            mean_std([_value(r, metric) for r in _select(rows, a, split, task).values()])
            for a in arms
        ]
        xs = [i + (k - 1) * width for i in range(len(arms))]
        ax.bar(
            xs,
            [s[0] for s in stats],
            width,
            yerr=[0 if s[2] < 2 else s[1] for s in stats],
            capsize=3,
            color=GROUP_COLOURS[group],
            label=f"{metric} ({GROUP_LABELS[group]})",
        )
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=20, ha="right")
    ax.set_ylabel(f"{split} {'box' if task == 'bbox' else 'mask'} AP")
    ax.set_title(f"AP by frequency group ({split} split; mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_class_means(per_class, arm, split, column="ap_box"):
    """class -> (mean AP over seeds, frequency group, train image count)."""
    acc: Dict[str, list] = {}
    for r in per_class:
        if r["arm"] == arm and r["split"] == split:
            v = _value(r, column)
            entry = acc.setdefault(
                r["class"], [[], r["frequency_group"], int(r["train_image_count"] or 0)]
            )
            if math.isfinite(v):
                entry[0].append(v)
    return {c: (statistics.fmean(v) if v else float("nan"), g, n) for c, (v, g, n) in acc.items()}


def best_baseline(
    rows, baselines: Sequence[str], split: str = "test", task: str = "bbox"
) -> Optional[str]:
    """The baseline with the highest mean AP (ties: the first listed)."""
    scored = [
        (mean_std([_value(r, "AP") for r in _select(rows, b, split, task).values()])[0], -i, b)
        for i, b in enumerate(baselines)
        if _select(rows, b, split, task)
    ]
    scored = [s for s in scored if math.isfinite(s[0])]
    return max(scored)[2] if scored else None


def plot_per_class_delta(
    rows, per_class, arm: str, baselines: Sequence[str], path: str, split: str = "test"
) -> Optional[str]:
    """
    Per-class box AP of ``arm`` minus its best baseline (by mean AP), both averaged over seeds,
    against training images per class (log scale). Returns the baseline used (None: no data).
    """
    baseline = best_baseline(rows, baselines, split)
    if baseline is None:
        return None
    ours, theirs = (
        _per_class_means(per_class, arm, split),
        _per_class_means(per_class, baseline, split),
    )
    points = [
        (ours[c][2], ours[c][0] - theirs[c][0], ours[c][1], c)
        for c in ours
        if c in theirs and math.isfinite(ours[c][0]) and math.isfinite(theirs[c][0])
    ]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for group in ("r", "c", "f"):
        pts = [p for p in points if p[2] == group]
        if pts:
            deltas = [p[1] for p in pts]
            ax.scatter(
                [max(p[0], 1) for p in pts],
                deltas,
                color=GROUP_COLOURS[group],
                s=28,
                label=f"{GROUP_LABELS[group]} (mean {statistics.fmean(deltas):+.1f})",
            )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel(f"Δ box AP ({arm} − {baseline})")
    ax.set_title(f"Per-class {split} box AP: {arm} minus {baseline} (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return baseline


def write_report(
    study, report_dir: str, meta: Optional[dict] = None, rows=None, per_class=None
) -> Dict[str, str]:
    """Write results.csv, per_class.csv, summary.md, groups.png and per_class_delta.png (from the
    finished runs of ``study`` unless ``rows`` / ``per_class`` are given); return their paths."""
    if rows is None or per_class is None:
        rows, per_class = collect_rows(study)
    os.makedirs(report_dir, exist_ok=True)
    paths = {
        name: os.path.join(report_dir, name)
        for name in (
            "results.csv",
            "per_class.csv",
            "summary.md",
            "groups.png",
            "per_class_delta.png",
        )
    }
    write_csv(paths["results.csv"], rows, RESULT_COLUMNS)
    write_csv(paths["per_class.csv"], per_class, PER_CLASS_COLUMNS)
    text = summary_markdown(study, rows, meta)
    split = study.splits[-1]  # test, unless the study only explores on val
    if rows:
        plot_groups(rows, list(study.arms), paths["groups.png"], split=split)
    focus = study.per_class_delta or tuple(a for a in study.arms if study.arms[a].compare_to)[:1]
    notes = []
    for k, arm in enumerate(focus):
        path = (
            paths["per_class_delta.png"]
            if k == 0
            else os.path.join(report_dir, f"per_class_delta_{arm}.png")
        )
        baseline = plot_per_class_delta(
            rows, per_class, arm, study.arms[arm].compare_to, path, split=split
        )
        if baseline is not None:
            notes.append(
                f"- `{os.path.basename(path)}`: per-class {split} box AP of {arm} minus its best "
                f"baseline by mean {split} AP, {baseline}"
            )
    if notes:
        text += (
            f"\n## Plots\n\n- `groups.png`: {split} box APr / APc / APf per arm (mean ± std over "
            "seeds)\n" + "\n".join(notes) + "\n"
        )
    probe = os.path.join(report_dir, "probe.md")  # python -m drcl2.tools.study ... --probe SEED
    if os.path.isfile(probe):
        text += "\n## Probe of the exported weights (before fine-tuning)\n\n" + open(probe).read()
    with open(paths["summary.md"], "w") as f:
        f.write(text)
    return paths
