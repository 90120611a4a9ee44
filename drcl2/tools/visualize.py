"""
See what 2DRCL pre-training trains on, and what a detector predicts:

    python -m drcl2.tools.visualize views --config-file configs/toy/pretrain_2drcl.yaml \\
        --num-images 8 --output-dir output/vis/views [KEY VALUE ...]
    python -m drcl2.tools.visualize predictions --config-file configs/toy/mask_rcnn_finetune.yaml \\
        --dataset lvis_v1_toy_val --num-images 8 --output-dir output/vis/predictions \\
        [--score-threshold 0.5] MODEL.WEIGHTS output/toy/mask_rcnn_finetune/model_final.pth
    python -m drcl2.tools.visualize predictions --config-file CFG --images a.jpg b.jpg \\
        --output-dir DIR MODEL.WEIGHTS W [KEY VALUE ...]

``views`` (a pre-training config, ``MODEL.META_ARCHITECTURE: "DRCL2"``) builds the training data
path as :class:`drcl2.engine.Trainer` does (``DATASETS.TRAIN``, its sampler, its
``TwoViewDatasetMapper``, the loader's per-image seeds from ``SEED``) and writes one PNG per image
of the first ``--num-images`` of the stream, in the order iterations ``--start-iter``, ``+1``, ...
of a one-process run take them: view 1 (left) with the masked patches of that iteration's step
(filled with ``MODEL.PIXEL_MEAN``, what the reconstruction heads see) and view 2 (right); pair ``i``
in the same colour in both views, solid when the step drew it for LCL / box-guided masking, dashed
when not; view 1's other detection targets dotted white (:mod:`drcl2.utils.visualize`). The model is
built on the CPU (its weights play no part in the draws) and given the training set's class
statistics. ``--start-iter K`` starts the stream at image ``K x SOLVER.IMS_PER_BATCH`` (with
aspect-ratio grouping the batches are then regrouped from there, as a resume without loader state).
With ``SEED -1`` a seed is drawn (printed): a run's own seed is in its checkpoints.

``predictions`` (a fine-tuning config) builds the detector as the Trainer does, loads
``MODEL.WEIGHTS`` and writes one PNG per image: the ground truth (left) and the detections scoring
at least ``--score-threshold`` (right), or the detections alone for ``--images``. The model's own
test score thresholds are set to ``--score-threshold``, as in detectron2's demo.

KEY VALUE config overrides come last (after the files of ``--images``). PNG names:
``NNN_<image file stem>.png`` (``views``: ``NNN_iterK_<stem>.png``).
"""

import argparse
import logging
import os
import re
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.logger import setup_logger
from PIL import Image

from ..config import load_config
from ..data.rebalance import build_rebalance_schedule
from ..engine import Trainer, resolve_seed
from ..engine.checks import check_config
from ..utils.visualize import draw_predictions, views_pictures

__all__ = ["main", "write_predictions", "write_views"]

logger = logging.getLogger("drcl2.visualize")

# A config key of the KEY VALUE overrides (MODEL.WEIGHTS, SOLVER.IMS_PER_BATCH, SEED, ...).
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def _check_registered(names: Sequence[str], key: str) -> None:
    """Raise KeyError naming ``key`` for a dataset name that is not registered."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            raise KeyError(
                f"{key}: dataset '{name}' is not registered! Available datasets are: "
                f"{', '.join(registered)}."
            )


def _save(picture: np.ndarray, path: str) -> str:
    Image.fromarray(picture).save(path)
    return path


def _stem(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0]


def write_views(cfg, num_images: int, output_dir: str, start_iter: int = 0) -> List[str]:
    """
    Write the views pictures of the first ``num_images`` images the training stream of ``cfg``
    (a DRCL2 config) gives from iteration ``start_iter`` on, one PNG each, into ``output_dir``.

    Returns:
        the paths written.
    """
    if cfg.MODEL.META_ARCHITECTURE != "DRCL2":
        raise ValueError(
            f"views needs a pre-training config (MODEL.META_ARCHITECTURE 'DRCL2'); this one has "
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}. Use `predictions` for a "
            "detector."
        )
    check_config(cfg)  # the Trainer's start-up checks
    seed = resolve_seed(cfg.SEED)
    dataset = Trainer.build_train_dataset(cfg)
    model = Trainer.build_model(cfg)
    model.seed = seed  # as the Trainer: the draws follow the run's seed
    schedule = build_rebalance_schedule(cfg)  # one schedule for the model and the sampler
    model.rebalance_schedule = schedule
    model.set_class_statistics(dataset)
    loader = Trainer.build_train_loader(
        cfg, start_iter=start_iter, dataset=dataset, seed=seed, schedule=schedule
    )
    metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    logger.info(f"views of {cfg.DATASETS.TRAIN} with seed {seed}, from iteration {start_iter}")
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for iteration, batch in enumerate(loader, start_iter):
        pictures = views_pictures(
            model,
            batch,
            iteration,
            image_format=cfg.INPUT.FORMAT,
            metadata=metadata,
            num_images=num_images - len(written),
        )
        for x, picture in zip(batch, pictures):
            name = f"{len(written):03d}_iter{iteration}_{_stem(x['file_name'])}.png"
            written.append(_save(picture, os.path.join(output_dir, name)))
        if len(written) >= num_images:
            return written
    return written


def _set_score_threshold(cfg, threshold: float) -> None:
    """Every detector's test score threshold the config has, set to ``threshold``."""
    for head in ("ROI_HEADS", "RETINANET", "ATSS", "FCOS"):
        node = cfg.MODEL.get(head)
        if node is not None and "SCORE_THRESH_TEST" in node:
            node.SCORE_THRESH_TEST = threshold


def write_predictions(
    cfg,
    output_dir: str,
    *,
    dataset: Optional[str] = None,
    images: Sequence[str] = (),
    num_images: int = 8,
    score_threshold: float = 0.5,
) -> List[str]:
    """
    Write the predictions pictures of the detector of ``cfg`` (weights ``MODEL.WEIGHTS``) on the
    first ``num_images`` images of the registered ``dataset`` (beside their ground truth), or on
    the image files ``images``, one PNG each, into ``output_dir``.

    Returns:
        the paths written.
    """
    if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
        raise ValueError(
            "predictions needs a detector config; MODEL.META_ARCHITECTURE 'DRCL2' is a "
            "pre-training model without inference (use `views`, or a fine-tuning config with the "
            "exported weights)."
        )
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError(
            "predictions needs the detector's weights: add `MODEL.WEIGHTS path/to/model_final.pth`."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS: no such file {weights!r}.")
    if dataset is not None:
        _check_registered([dataset], "--dataset")
        records = DatasetCatalog.get(dataset)[:num_images]
        metadata = MetadataCatalog.get(dataset)
    else:
        for path in images:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--images: no such file {path!r}.")
        records = [{"file_name": path} for path in images]
        named = [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]
        metadata = MetadataCatalog.get(named[0]) if named else None
    cfg = cfg.clone()
    _set_score_threshold(cfg, score_threshold)
    model = Trainer.build_model(cfg)
    model.eval()
    DetectionCheckpointer(model).load(weights)
    mapper = DatasetMapper(cfg, is_train=False)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for i, record in enumerate(records):
        inputs = mapper(dict(record))
        with torch.no_grad():
            instances = model([inputs])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        image = utils.read_image(record["file_name"], format="RGB")
        picture = draw_predictions(
            image, instances, metadata, ground_truth=record if dataset is not None else None
        )
        name = f"{i:03d}_{_stem(record['file_name'])}.png"
        written.append(_save(picture, os.path.join(output_dir, name)))
    return written


def _split_opts(files: Sequence[str], opts: Sequence[str]):
    """``--images a.jpg MODEL.WEIGHTS w``: argparse gives the config keys to --images; move them
    (from the first config key that is not a file) to the overrides."""
    for i, f in enumerate(files):
        if _CONFIG_KEY.match(f) and not os.path.exists(f):
            return list(files[:i]), list(files[i:]) + list(opts)
    return list(files), list(opts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    views = commands.add_parser("views", help="the two pre-training views of training images")
    views.add_argument("--config-file", required=True, help="a DRCL2 pre-training config")
    views.add_argument("--num-images", type=int, default=8)
    views.add_argument("--output-dir", required=True)
    views.add_argument("--start-iter", type=int, default=0, help="the stream from this iteration")
    preds = commands.add_parser("predictions", help="a detector's detections")
    preds.add_argument("--config-file", required=True, help="a fine-tuning (detector) config")
    source = preds.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a registered dataset (drawn beside its ground truth)")
    source.add_argument("--images", nargs="+", help="image files")
    preds.add_argument("--num-images", type=int, default=8, help="images of --dataset")
    preds.add_argument("--output-dir", required=True)
    preds.add_argument("--score-threshold", type=float, default=0.5)
    for sub in (views, preds):
        sub.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="drcl2")
    import drcl2  # noqa: F401  (registers the datasets and models)

    try:
        if args.command == "views":
            cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
            written = write_views(cfg, args.num_images, args.output_dir, args.start_iter)
        else:
            images, opts = _split_opts(args.images or [], args.opts)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            cfg = load_config(args.config_file, ["MODEL.DEVICE", device, *opts])
            written = write_predictions(
                cfg,
                args.output_dir,
                dataset=args.dataset,
                images=images,
                num_images=args.num_images,
                score_threshold=args.score_threshold,
            )
    except KeyError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} pictures to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
