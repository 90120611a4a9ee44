"""
Is a pre-training run worth a fine-tuning? Probe the weights it exported, before fine-tuning them:

    python -m drcl2.tools.probe --config-file configs/toy/mask_rcnn_finetune.yaml \\
        --dataset lvis_v1_toy_val random \\
        scratch=output/study/toy/supervised_pretrain/seed1/pretrain/model_final_finetune.pth \\
        output/study/toy/2drcl/seed1/pretrain/model_final_finetune.pth

Each WEIGHTS is a file (``NAME=PATH`` names its row) or ``random``: the config's own initialisation
(with its ``SEED``). The config is the fine-tuning config the weights are meant for: its model
(``backbone`` + ``roi_heads.box_pooler`` / ``box_head``) is built, the weights' fine-tuning parts
(``backbone.*``, ``proposal_generator.*``, ``roi_heads.box_head.*``, see
:func:`drcl2.export.finetune_state_dict`) are loaded, and the ground-truth boxes of the
training split (``--train-dataset``, default the config's first ``DATASETS.TRAIN``) and of
``--dataset`` are pooled at test size. Printed and written (``--output-dir``: probe.csv, probe.md)
for every row (:mod:`drcl2.evaluation.health`):

    probe_roi_*   linear probe on RoIAlign features (top-1, class-balanced, per frequency group)
    probe_box_*   the same on box-head embeddings; ncc_box: nearest-class-centroid accuracy
    rank_*        effective rank (RankMe) of RoI features, box-head embeddings, FPN levels
    std_*         per-channel std of l2-normalised features x sqrt(dim): ~1 spread, 0 collapsed
    box_norm      mean norm of the box head's output
    and per stage (stem, res2-5, fpn, rpn, box_head): weight norm ratio, weight change and norm-
    affine change against the random initialisation.

Chance for the balanced probe is 1 / (classes in the scored split). A run whose probe is at or below
the ``random`` row's, or whose ranks fell far below it, has collapsed: fine-tuning it costs AP.
"""

import argparse
import csv
import logging
import math
import os
import sys
import time
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from .. import config
from ..evaluation.health import class_groups, extract_box_features, feature_health, stage_changes
from ..export import finetune_state_dict

__all__ = ["probe_weights", "probe_study_exports", "write_probe_report", "main", "probe_modules"]

logger = logging.getLogger("drcl2.probe")

# The columns of the printed table (all of them go to the CSV).
MAIN_COLUMNS = (
    "probe_roi_top1",
    "probe_roi_balanced",
    "probe_roi_balanced_r",
    "probe_roi_balanced_c",
    "probe_roi_balanced_f",
    "probe_box_balanced",
    "ncc_box",
    "rank_roi",
    "rank_box",
    "std_roi",
    "std_box",
    "box_norm",
)
STAGE_FIELDS = ("weight_norm_ratio", "weight_change", "affine_change")


def probe_modules(model) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, List[str]]:
    """(backbone, box_pooler, box_head, box_in_features) of a detectron2 R-CNN (or a DRCL2
    model)."""
    roi_heads = getattr(model, "roi_heads", None)
    if not hasattr(model, "backbone") or not all(
        hasattr(roi_heads, k) for k in ("box_pooler", "box_head", "box_in_features")
    ):
        raise ValueError(
            "The probe needs a model with `backbone` and `roi_heads.box_pooler` / `box_head` (an "
            f"R-CNN); {type(model).__name__} has none. Give the probe the Mask / Faster R-CNN "
            "config the weights are fine-tuned with (e.g. configs/toy/mask_rcnn_finetune.yaml)."
        )
    return model.backbone, roi_heads.box_pooler, roi_heads.box_head, list(roi_heads.box_in_features)


def load_finetune_parts(model, path: str) -> List[str]:
    """
    Load the fine-tuning parts of the weights file ``path`` into ``model`` (a detectron2 ``.pth``
    checkpoint: a DRCL2 or detector run, or an export; anything else through detectron2's
    checkpointer). Returns the parts found (``backbone``, ``proposal_generator``, ``box_head``).
    """
    if not os.path.isfile(path) and "://" not in path:
        raise FileNotFoundError(f"weights file '{path}' does not exist.")
    if path.endswith((".pth", ".pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = finetune_state_dict(state, source=path)
        incompatible = model.load_state_dict(state, strict=False)
        if incompatible.unexpected_keys:
            raise ValueError(
                f"'{path}' does not fit the config's model: unexpected keys "
                f"{incompatible.unexpected_keys[:5]} ... (is it the config of these weights?)"
            )
        keys = state.keys()
    else:
        DetectionCheckpointer(model).load(path)
        keys = model.state_dict().keys()
    found = [p.split(".")[-1] for p in ("backbone", "proposal_generator", "roi_heads.box_head")
             if any(k.startswith(p + ".") for k in keys)]  # fmt: skip
    return found


def _label(spec: str) -> Tuple[str, str]:
    """(row name, path) of a WEIGHTS argument: ``NAME=PATH``, ``random``, or a path (named by its
    folders)."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
        return name, path
    if spec == "random":
        return "random", "random"
    parts = os.path.normpath(spec).split(os.sep)
    return "/".join(parts[-4:-1]) or spec, spec


def probe_weights(
    cfg,
    weights: List[str],
    train_dataset: str,
    dataset: str,
    max_train_images: int = 2000,
    max_images: int = 1000,
) -> Tuple[List[Dict], float]:
    """
    The probe table: one row per WEIGHTS spec (see the module doc), as dicts with ``weights``,
    ``path``, ``loaded`` and every figure of :func:`feature_health` and :func:`stage_changes`
    (``<stage>_<field>``). Also returns the chance level of the balanced probe.
    """
    train_dicts = DatasetCatalog.get(train_dataset)[:max_train_images]
    test_dicts = DatasetCatalog.get(dataset)[:max_images]
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    groups = class_groups(dataset, num_classes, DatasetCatalog.get(train_dataset))
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    random_state = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    rows = []
    for spec in weights:
        name, path = _label(spec)
        model = build_model(cfg)
        model.load_state_dict(random_state)  # the same initialisation under every row
        loaded = ["random init"] if path == "random" else load_finetune_parts(model, path)
        modules = probe_modules(model)
        kwargs = dict(
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            image_format=cfg.INPUT.FORMAT,
        )
        start = time.perf_counter()
        train = extract_box_features(*modules, train_dicts, **kwargs)
        test = extract_box_features(*modules, test_dicts, **kwargs)
        row = {"weights": name, "path": path, "loaded": "+".join(loaded) or "nothing"}
        row.update(feature_health(train, test, num_classes, groups))
        for stage, values in stage_changes(model.state_dict(), random_state).items():
            for key, value in values.items():
                row[f"{stage}_{key}"] = value
        logger.info(
            f"probed {name} in {time.perf_counter() - start:.1f} s ({len(train.classes)} / "
            f"{len(test.classes)} boxes)"
        )
        rows.append(row)
    present = len(set(test.classes.tolist())) if rows else 0
    return rows, (1.0 / present if present else float("nan"))


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def tables(rows: List[Dict]) -> Tuple[str, str]:
    """The two markdown tables (features; weight change per stage) of ``rows``."""
    main = tabulate(
        [
            [r["weights"]]
            + [_fmt(r.get(c, float("nan"))) for c in MAIN_COLUMNS]
            + [_fmt(r[k]) for k in sorted(r) if k.startswith("rank_p")]
            for r in rows
        ],  # fmt: skip
        headers=["weights", *MAIN_COLUMNS, *sorted(k for k in rows[0] if k.startswith("rank_p"))],
        tablefmt="github",
    )
    stages = [k[: -len("_weight_change")] for k in rows[0] if k.endswith("_weight_change")]
    change = tabulate(
        [
            [r["weights"], r["loaded"]]
            + ["/".join(_fmt(r[f"{s}_{f}"]) or "-" for f in STAGE_FIELDS) for s in stages]
            for r in rows
        ],  # fmt: skip
        headers=["weights", "loaded", *stages],
        tablefmt="github",
    )
    return main, change


def load_config(config_file: str, opts=()):
    """The probe's config: drcl2's keys, the file, the overrides, on CUDA when there is one, no
    MODEL.WEIGHTS."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return config.load_config(config_file, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", *opts])


def probe_markdown(rows: List[Dict], header: str) -> str:
    """The header and both tables of ``rows``, in markdown."""
    main_table, change_table = tables(rows)
    stage_note = (
        "Per stage: weight norm ratio / weight change / norm-affine change against the random init."
    )
    return "\n\n".join([header, main_table, stage_note, change_table]) + "\n"


def write_probe_report(rows: List[Dict], header: str, output_dir: str) -> str:
    """Write ``probe.csv`` and ``probe.md`` (:func:`probe_markdown`) to ``output_dir``; return the
    markdown."""
    text = probe_markdown(rows, header)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "probe.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "probe.md"), "w") as f:
        f.write(text)
    return text


def probe_study_exports(
    study, report_dir: str, seed: int, max_train_images: int = 2000, max_images: int = 1000
) -> str:
    """
    Probe the exported weights of every arm of ``study`` that pre-trains (seed ``seed``, finished
    runs only) beside the fine-tuning config's random initialisation: scored on the study's val
    split, trained on its train split, with the first arm's fine-tuning config. Writes probe.csv /
    probe.md into ``report_dir`` (the study report's summary.md then includes the table).
    """
    finetune_config = next(iter(study.arms.values())).finetune.config
    cfg = load_config(finetune_config, ["SEED", str(seed)])
    weights, seen = ["random"], set()
    for arm in study.arms.values():
        if arm.pretrain is None or arm.pretrain_from or seed not in arm.seeds:
            continue
        path = os.path.join(study.stage_dir(arm, seed, arm.pretrain), "model_final_finetune.pth")
        if os.path.isfile(path) and path not in seen:
            seen.add(path)
            weights.append(f"{arm.name}={path}")
    rows, chance = probe_weights(
        cfg, weights, study.datasets["train"], study.datasets["val"], max_train_images, max_images
    )
    header = (
        f"Exported weights of seed {seed} before fine-tuning (`python -m drcl2.tools.probe`; "
        f"`random` = the initialisation of {finetune_config} at seed {seed}, what `scratch` "
        f"fine-tunes): probe trained on {study.datasets['train']} (<= {max_train_images} images), "
        f"scored on {study.datasets['val']} (<= {max_images} images, {int(rows[0]['boxes'])} "
        f"boxes); balanced-probe chance {chance:.3f}."
    )
    return write_probe_report(rows, header, report_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file", required=True, help="the fine-tuning config of the weights"
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="registered dataset the probe is scored on (e.g. a val split)",
    )
    parser.add_argument(
        "--train-dataset",
        default=None,
        help="dataset the probe is trained on (default: DATASETS.TRAIN[0])",
    )
    parser.add_argument("--max-train-images", type=int, default=2000)
    parser.add_argument("--max-images", type=int, default=1000, help="images of --dataset scored")
    parser.add_argument("--output-dir", default=None, help="write probe.csv and probe.md here")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides: KEY VALUE ...")
    parser.add_argument("weights", nargs="+", help="'random', a weights file, or NAME=FILE")
    args = parser.parse_args(argv)
    setup_logger(name="drcl2")
    cfg = load_config(args.config_file, args.opts)
    train_dataset = args.train_dataset or cfg.DATASETS.TRAIN[0]
    import drcl2  # noqa: F401  (registers the datasets)

    try:
        rows, chance = probe_weights(
            cfg, args.weights, train_dataset, args.dataset, args.max_train_images, args.max_images
        )
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = (
        f"Probe of {len(rows)} weights: config {args.config_file}, trained on {train_dataset} (<= "
        f"{args.max_train_images} images), scored on {args.dataset} (<= {args.max_images} images, "
        f"{int(rows[0]['boxes'])} boxes); balanced-probe chance {chance:.3f}; device "
        f"{cfg.MODEL.DEVICE}."
    )
    print(probe_markdown(rows, header))
    if args.output_dir:
        write_probe_report(rows, header, args.output_dir)
        print(f"wrote {args.output_dir}/probe.csv and probe.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
