"""
Per-class AP reports: ``per_class_ap.csv`` (one row per class) and ``per_class_ap.png`` (AP against
training frequency, log x-axis, one colour per frequency group) — the picture long-tail papers argue
with.

Rows are plain dicts with the columns, in order:

    class, frequency_group, train_image_count, [train_instance_count,] ap_box, ap_mask

AP in percent (IoU 0.5:0.95, all areas); an empty cell where a class has no ground truth in the
evaluated set (AP undefined) or where the task was not evaluated / the count is unknown.
"""

import csv
import logging
import math
import os

from detectron2.utils.file_io import PathManager

from ..data.lvis_format import frequency_group

logger = logging.getLogger(__name__)

__all__ = [
    "lvis_per_class_rows",
    "write_per_class_report",
    "PER_CLASS_CSV",
    "PER_CLASS_PNG",
]

PER_CLASS_CSV = "per_class_ap.csv"
PER_CLASS_PNG = "per_class_ap.png"
_TASK_COLUMNS = (("bbox", "ap_box"), ("segm", "ap_mask"))


def lvis_per_class_rows(metadata, categories, per_class_ap):
    """
    One row per category of an LVIS-format evaluation.

    Args:
        metadata (Metadata): the evaluated dataset's metadata. Used when present:
            ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` (names; without the mapping,
            contiguous id = dataset id - 1, detectron2's LVIS convention), ``class_image_count``
            (list of {"id", "image_count"}: the training image counts) and ``class_frequency``
            ("r"/"c"/"f" per contiguous id).
        categories (list[dict]): the evaluated json's categories (``id``, ``name``, optionally
            ``frequency`` and ``image_count``, the training image count, as LVIS files carry them
            and as :func:`~drcl2.evaluation.lvis_evaluation.complete_lvis_ground_truth` derives
            them).
        per_class_ap (dict[str, dict[int, float]]): task ("bbox"/"segm") -> dataset category id ->
        AP.

    Returns:
        list[dict]: rows sorted by dataset category id. The frequency group is the json's
        ``frequency`` (the group the evaluation used), else ``class_frequency``, else LVIS's rule on
        the image count (r <= 10 < c <= 100 < f); the image count is the json's ``image_count``,
        else ``class_image_count``'s.
    """
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    thing_classes = metadata.get("thing_classes", None)
    class_frequency = metadata.get("class_frequency", None)
    image_counts = {
        c["id"]: c["image_count"] for c in metadata.get("class_image_count", None) or []
    }
    rows = []
    for cat in sorted(categories, key=lambda c: c["id"]):
        cat_id = cat["id"]
        contiguous = id_map[cat_id] if id_map is not None else cat_id - 1
        name = cat.get("name", str(cat_id))
        if thing_classes is not None and 0 <= contiguous < len(thing_classes):
            name = thing_classes[contiguous]
        count = cat["image_count"] if "image_count" in cat else image_counts.get(cat_id)
        if cat.get("frequency"):
            group = cat["frequency"]
        elif class_frequency is not None and 0 <= contiguous < len(class_frequency):
            group = class_frequency[contiguous]
        elif count is not None:
            group = frequency_group(count)
        else:
            group = ""
        row = {"class": name, "frequency_group": group, "train_image_count": count}
        for task, column in _TASK_COLUMNS:
            row[column] = per_class_ap.get(task, {}).get(cat_id, float("nan"))
        rows.append(row)
    return rows


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return value


def write_per_class_report(rows, output_dir, *, x_key, x_label, title, group_order=("r", "c", "f")):
    """
    Write ``per_class_ap.csv`` and ``per_class_ap.png`` into ``output_dir``.

    Args:
        rows (list[dict]): as made by :func:`lvis_per_class_rows` (all rows have the same keys).
        output_dir (str): created if missing.
        x_key (str): the row key plotted on the (log) x-axis, e.g. "train_image_count".
        x_label (str): its axis label.
        title (str): figure title.
        group_order (tuple[str]): the frequency groups, in legend order.

    Returns:
        tuple[str, str]: paths of the CSV and the PNG.
    """
    PathManager.mkdirs(output_dir)
    csv_path = os.path.join(output_dir, PER_CLASS_CSV)
    with PathManager.open(csv_path, "w") as f:
        writer = csv.writer(f)
        columns = (
            list(rows[0].keys())
            if rows
            else ["class", "frequency_group", x_key, "ap_box", "ap_mask"]
        )
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])
    png_path = os.path.join(output_dir, PER_CLASS_PNG)
    _plot(rows, png_path, x_key=x_key, x_label=x_label, title=title, group_order=group_order)
    logger.info(f"Per-class AP written to {csv_path} and {png_path}")
    return csv_path, png_path


def _plot(rows, path, *, x_key, x_label, title, group_order):
    # The object-oriented API with an Agg canvas: no pyplot state, no display needed.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    def present(v):
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    columns = [c for _, c in _TASK_COLUMNS if any(present(r.get(c)) for r in rows)] or ["ap_box"]
    fig = Figure(figsize=(6 * len(columns), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(columns), squeeze=False)
    colours = colormaps["tab10"]
    groups = list(group_order) + sorted({r["frequency_group"] for r in rows} - set(group_order))
    for ax, column in zip(axes[0], columns):
        plotted = 0
        for i, group in enumerate(groups):
            pts = [
                (r[x_key], r[column])
                for r in rows
                if r["frequency_group"] == group
                and present(r.get(column))
                and present(r.get(x_key))
                and r[x_key] > 0
            ]
            if not pts:
                continue
            xs, ys = zip(*pts)
            mean = sum(ys) / len(ys)
            colour = colours(i % 10)
            ax.scatter(
                xs,
                ys,
                s=14,
                alpha=0.75,
                color=colour,
                label=f"{group or '?'}: {len(pts)}, mean {mean:.1f}",
            )
            # The group's mean per-class AP, drawn across the group's span of training counts.
            ax.hlines(mean, min(xs), max(xs), colors=[colour], linestyles="dashed", linewidth=1)
            plotted += len(pts)
        ax.set_xscale("log")
        # No minor ticks: every tick is a few artists of its own, and on log axes they were most of
        # the drawing time (which counts in the evaluation's).
        ax.minorticks_off()
        ax.xaxis.set_major_formatter(
            StrMethodFormatter("{x:,.0f}")
        )  # plain text, no mathtext to lay out
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{'box' if column == 'ap_box' else 'mask'} AP (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(title="group: classes, mean AP", fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no class has both an AP and a training count",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    fig.suptitle(title)
    # Fixed margins: tight_layout measured every tick label and took longer than the evaluation.
    width = 6 * len(columns)  # inches
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.12, top=0.9, wspace=0.2)
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
