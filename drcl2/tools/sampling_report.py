"""
How often the training set's classes are seen under each sampler (dynamic rebalancing report).

    python -m drcl2.tools.sampling_report --config-file CFG [--out DIR] [KEY VALUE ...]

For the config's training set (``DATASETS.TRAIN``, loaded as the Trainer loads it) it computes the
expected number of instances of each class seen per 1,000 iterations of ``SOLVER.IMS_PER_BATCH``
images under

    (a) no resampling (every image once per pass),
    (b) image-level repeat-factor sampling (detectron2's RepeatFactorTrainingSampler; t =
        DATALOADER.REPEAT_THRESHOLD, or DATALOADER.DRCL2.REPEAT_THRESHOLD when that is 0),
    (c) the dynamic rebalancing sampler at λ = 0, 0.5 and 1 (t = DATALOADER.DRCL2.REPEAT_THRESHOLD),

prints it by LVIS frequency group (r / c / f) and writes, into ``--out`` (default
``OUTPUT_DIR/sampling_report``), ``sampling_report.png`` (classes sorted by training frequency,
log scale) and ``sampling_report.csv`` (one row per class).

A sampler that draws image I with probability r_I / Σ_J r_J sees, per 1,000 iterations of B
images, 1000 · B · Σ_I r_I n_{I,c} / Σ_J r_J instances of class c (n_{I,c}: instances of c in I).
"""

import argparse
import csv
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from tabulate import tabulate

logger = logging.getLogger("drcl2.tools.sampling_report")

LAMBDAS = (0.0, 0.5, 1.0)
GROUPS = ("r", "c", "f")


def instances_seen_per_class(
    dataset_dicts: List[dict], image_weights: np.ndarray, images_seen: float, num_classes: int
) -> np.ndarray:
    """
    Expected instances of each class seen when ``images_seen`` images are drawn, image I with
    probability ∝ ``image_weights[I]`` (its repeat factor).

    Args:
        dataset_dicts (list[dict]): N detectron2 dataset dicts.
        image_weights (ndarray[N]): r_I >= 0.
        images_seen (float): number of images drawn (iterations × images per batch).
        num_classes (int): C.
    Returns:
        ndarray[C] float64.
    """
    from drcl2.data.rebalance import _flatten

    counts, classes, _ = _flatten(dataset_dicts, num_classes)
    image_weights = np.asarray(image_weights, dtype=np.float64)
    if image_weights.shape != counts.shape:
        raise ValueError(
            f"image_weights has shape {image_weights.shape}; expected ({counts.size},)."
        )
    per_instance = np.repeat(image_weights, counts)
    seen = np.bincount(classes, weights=per_instance, minlength=num_classes)
    return seen * (images_seen / image_weights.sum())


def _frequency_groups(metadata, image_count: np.ndarray) -> List[str]:
    """r / c / f per contiguous class: the dataset's metadata if it has them, else LVIS's rule."""
    from drcl2.data.lvis_format import frequency_group

    num_classes = len(image_count)
    groups = metadata.get("class_frequency", None)
    if groups is not None and len(groups) == num_classes:
        return list(groups)
    counts = metadata.get("class_image_count", None)
    if counts is not None and len(counts) == num_classes:
        return [frequency_group(int(c["image_count"])) for c in counts]
    return [frequency_group(int(n)) for n in image_count]


def sampling_report(
    cfg, dataset_dicts: List[dict], metadata, out_dir: Optional[str] = None
) -> Dict:
    """
    Compute the report for ``dataset_dicts``; print the tables; write PNG and CSV into ``out_dir``
    (when given).

    Returns:
        dict with ``columns`` (list[str]), ``seen`` (ndarray[C, K]: instances seen per 1,000
        iterations per class and column), ``groups`` (list[str]), ``image_count`` (ndarray[C]),
        ``instance_count`` (ndarray[C]), ``png`` and ``csv`` (paths, or None).
    """
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from drcl2.data.rebalance import class_statistics, image_repeat_factor_sets, mix_repeat_factors

    if not dataset_dicts:
        raise ValueError(f"The training set {tuple(cfg.DATASETS.TRAIN)} is empty.")
    thing_classes = metadata.get("thing_classes", None)
    f_img, f_ins = class_statistics(dataset_dicts, len(thing_classes) if thing_classes else None)
    num_classes = len(f_img)
    num_images = len(dataset_dicts)
    num_instances = sum(len(d.get("annotations") or ()) for d in dataset_dicts)
    image_count = np.rint(f_img.numpy() * num_images).astype(np.int64)
    instance_count = np.rint(f_ins.numpy() * num_instances).astype(np.int64)
    groups = _frequency_groups(metadata, image_count)

    t_drb = float(cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD)
    t_rfs = float(cfg.DATALOADER.REPEAT_THRESHOLD) or t_drb
    images_seen = 1000 * cfg.SOLVER.IMS_PER_BATCH
    weights = {"none": np.ones(num_images)}
    weights[f"RFS t={t_rfs:g}"] = (
        RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, t_rfs
        ).numpy()
    )
    image_level, instance_level = image_repeat_factor_sets(dataset_dicts, t_drb)
    for lam in LAMBDAS:
        weights[f"DRB λ={lam:g}"] = mix_repeat_factors(image_level, instance_level, lam)
    columns = list(weights)
    seen = np.stack(
        [
            instances_seen_per_class(dataset_dicts, w, images_seen, num_classes)
            for w in weights.values()
        ],
        axis=1,
    )

    # ---- tables ---------------------------------------------------------------------------------
    groups_arr = np.asarray(groups)
    present = image_count > 0
    rows_mean, rows_share = [], []
    total_seen = seen.sum(axis=0)
    for name, mask in [*((g, (groups_arr == g) & present) for g in GROUPS), ("all", present)]:
        n = int(mask.sum())
        mean = seen[mask].mean(axis=0) if n else np.zeros(len(columns))
        share = 100.0 * seen[mask].sum(axis=0) / total_seen
        rows_mean.append([name, n, int(instance_count[mask].sum()), *[f"{v:,.1f}" for v in mean]])
        rows_share.append([name, n, *[f"{v:.2f}" for v in share]])
    print(
        f"\nSampling report — {', '.join(cfg.DATASETS.TRAIN)}: {num_images:,} images, "
        f"{num_instances:,} instances, {int(present.sum())} classes present (of {num_classes}); "
        f"{cfg.SOLVER.IMS_PER_BATCH} images per iteration; RFS t={t_rfs:g}, DRB t={t_drb:g}"
    )
    print("\nInstances seen per class per 1,000 iterations (mean over the classes of each group):")
    print(
        tabulate(rows_mean, headers=["group", "classes", "instances", *columns], tablefmt="github")
    )
    print("\nShare of all instances seen (%):")
    print(tabulate(rows_share, headers=["group", "classes", *columns], tablefmt="github"))

    png = csv_path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        names = thing_classes or [str(c) for c in range(num_classes)]
        csv_path = os.path.join(out_dir, "sampling_report.csv")
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["class_id", "name", "group", "image_count", "instance_count", *columns]
            )
            for c in range(num_classes):
                writer.writerow(
                    [
                        c,
                        names[c],
                        groups[c],
                        image_count[c],
                        instance_count[c],
                        *[f"{v:.6g}" for v in seen[c]],
                    ]
                )
        png = os.path.join(out_dir, "sampling_report.png")
        _plot(
            seen[present],
            columns,
            image_count[present],
            groups_arr[present],
            png,
            title=f"{', '.join(cfg.DATASETS.TRAIN)}: {images_seen:,} images per 1,000 iterations",
        )
        print(f"\nWrote {png} and {csv_path}")
    return {
        "columns": columns,
        "seen": seen,
        "groups": groups,
        "image_count": image_count,
        "instance_count": instance_count,
        "png": png,
        "csv": csv_path,
    }


def _plot(seen, columns, image_count, groups, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-image_count, kind="stable")  # most frequent class first
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    styles = ["-", "--", ":", "-", "-"]
    for k, name in enumerate(columns):
        ax.plot(x, seen[order, k], styles[k % len(styles)], lw=1.2, label=name)
    # shade the frequency groups
    g_sorted = groups[order]
    for g, color in zip(GROUPS, ("#f4cccc", "#fff2cc", "#d9ead3")):
        idx = np.flatnonzero(g_sorted == g)
        if idx.size:
            ax.axvspan(
                idx.min() - 0.5, idx.max() + 0.5, color=color, alpha=0.5, lw=0, label=f"group {g}"
            )
    ax.set_yscale("log")
    ax.set_xlabel("class, sorted by number of training images (most frequent first)")
    ax.set_ylabel("instances seen per 1,000 iterations (log scale)")
    ax.set_title(title)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def setup_cfg(config_file: str, opts: Sequence[str]):
    from drcl2.config import load_config

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file '{config_file}' does not exist.")
    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.sampling_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a drcl2 config")
    parser.add_argument(
        "--out", default=None, help="output folder (default: OUTPUT_DIR/sampling_report)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

    import drcl2  # noqa: F401  (registers drcl2's datasets)

    cfg = setup_cfg(args.config_file, args.opts)
    if not cfg.DATASETS.TRAIN:
        raise SystemExit(f"{args.config_file}: DATASETS.TRAIN is empty; nothing to report on.")
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    out_dir = args.out or os.path.join(cfg.OUTPUT_DIR, "sampling_report")
    return sampling_report(cfg, dataset_dicts, MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
