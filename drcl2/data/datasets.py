"""Datasets drcl2 registers on import (the generated LVIS-format sets), and the checks of datasets
that drcl2's Trainer runs before the first step.

Three generated sets (:mod:`drcl2.data.generated.toy_lvis`), each with three splits: ``train``,
``val`` (choose and tune on it) and ``test`` (held out: drawn like val from its own seeds, for
reported results only):

* ``lvis_v1_toy_{train,val,test}``: the demo and test set (30 classes, <= 128 px, CPU-sized);
* ``lvis_v1_toy_source_{train,val,test}``: the source set, the toy stand-in for ImageNet (120
  classes disjoint from the toy set's, 8,000 training images): a detector trained on it gives the
  source initialisation of the paper's setting (``configs/toy/mask_rcnn_source.yaml``);
* ``lvis_v1_gen_large_{train,val,test}``: the GPU set (300 classes in LVIS v1's rare / common /
  frequent shares, 320-480 px, 10,000 / 1,000 / 1,000 images).
"""

import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .dataset_check import check_datasets
from .generated.toy_lvis import (
    GENERATED_SETS,
    SPLITS,
    ToyLVISSpec,
    ensure_toy_lvis,
    toy_lvis_categories,
    toy_lvis_paths,
)
from .lvis_format import load_lvis_format_json, lvis_format_metadata

__all__ = [
    "register_toy_lvis",
    "TOY_LVIS_DATASETS",
    "GENERATED_DATASETS",
    "check_dataset_files",
    "check_datasets_before_training",
    "check_test_dataset",
]


def _dataset_names(spec: ToyLVISSpec):
    return {f"{spec.name}_{split}": split for split in SPLITS}


TOY_LVIS_DATASETS = _dataset_names(GENERATED_SETS["toy"])
# every generated split drcl2 registers: dataset name -> split
GENERATED_DATASETS = {
    name: split for spec in GENERATED_SETS.values() for name, split in _dataset_names(spec).items()
}


def register_toy_lvis(root: str, spec: ToyLVISSpec = ToyLVISSpec()) -> None:
    """
    Register ``<spec.name>_train`` / ``_val`` / ``_test`` (``lvis_v1_toy_*`` by default) under
    ``root``. Nothing is read or written now: the metadata comes from the generator's layout, and
    the set is generated under ``root`` the first time its dicts are asked for
    (``DatasetCatalog.get``; one rendering process per CPU core for large sets).
    """
    paths = toy_lvis_paths(root, spec)
    metadata = lvis_format_metadata({"categories": toy_lvis_categories(spec)})

    def load(split):
        ensure_toy_lvis(root, spec)
        return load_lvis_format_json(paths[f"{split}_json"], paths["image_root"])

    for name, split in _dataset_names(spec).items():
        DatasetCatalog.register(name, lambda split=split: load(split))
        MetadataCatalog.get(name).set(
            json_file=paths[f"{split}_json"],
            image_root=paths["image_root"],
            evaluator_type="lvis",
            **metadata,
        )


def _readme_section(name: str) -> str:
    if name.startswith("lvis_v1_toy_source"):
        return "The toy source set"
    if name.startswith("lvis_v1_toy"):
        return "The toy LVIS v1 set"
    if name.startswith("lvis_v1_gen_large"):
        return "The large generated LVIS v1 set"
    if name.startswith("lvis"):
        return "LVIS v1"
    if name.startswith("coco_lt"):
        return "COCO-LT"
    if name.startswith("coco"):
        return "COCO"
    return "Your own LVIS-format data"


def check_dataset_files(dataset_names: Iterable[str]) -> None:
    """
    Fail early, and say what to do, when a registered dataset's annotation file or image folder is
    not on disk (rather than deep inside a loader). The generated sets are skipped: they are
    generated on use.

    Raises:
        FileNotFoundError: naming the dataset, the missing path and the datasets/README.md section.
    """
    for name in dataset_names:
        if name in GENERATED_DATASETS:
            continue
        meta = MetadataCatalog.get(name)
        for what, path in (
            ("annotation file", meta.get("json_file", None)),
            ("image folder", meta.get("image_root", None)),
        ):
            if path and not PathManager.exists(path):
                raise FileNotFoundError(
                    f"Dataset '{name}': its {what} '{path}' does not exist. Datasets are found "
                    "under $DETECTRON2_DATASETS (now "
                    f"'{os.getenv('DETECTRON2_DATASETS', 'datasets')}'); see datasets/README.md, "
                    f"section '{_readme_section(name)}'."
                )


def _check_hint(names) -> str:
    sections = sorted({_readme_section(n) for n in names})
    return (
        f"See datasets/README.md, section(s) {sections}; `python -m drcl2.tools.check_dataset "
        "NAME` lists the same findings (with --images it also decodes every image)."
    )


def check_datasets_before_training(cfg, train_dicts) -> None:
    """
    The check drcl2's Trainer runs before the first step (:mod:`drcl2.data.dataset_check`): the
    training dicts (``train_dicts``, as loaded and filtered from ``cfg.DATASETS.TRAIN``) and every
    dataset of ``cfg.DATASETS.TEST`` (loaded now, so that a broken test set is found before training
    rather than after it). Images are decoded only with ``cfg.DATASETS.DRCL2.CHECK_IMAGES``.

    Raises:
        FileNotFoundError: a test set's annotation file or image folder is missing.
        DatasetCheckError: errors in a dataset (missing image files, unknown categories, ...); the
            warnings (boxes detectron2 drops) are logged.
    """
    options = dict(
        decode_images=cfg.DATASETS.DRCL2.CHECK_IMAGES, num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    check_datasets(cfg.DATASETS.TRAIN, train_dicts, hint=_check_hint(cfg.DATASETS.TRAIN), **options)
    for name in cfg.DATASETS.TEST:
        check_test_dataset(cfg, name)


def check_test_dataset(cfg, dataset_name: str) -> None:
    """
    :func:`check_dataset_files` and :func:`~drcl2.data.dataset_check.check_datasets` on one test
    dataset, once per process (the Trainer builds a test loader at every evaluation).
    """
    check_dataset_files([dataset_name])
    check_datasets(
        [dataset_name],
        decode_images=cfg.DATASETS.DRCL2.CHECK_IMAGES,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        hint=_check_hint([dataset_name]),
    )


# Like detectron2's builtin datasets: under $DETECTRON2_DATASETS, default ./datasets
for _spec in GENERATED_SETS.values():
    if f"{_spec.name}_train" not in DatasetCatalog.list():
        register_toy_lvis(os.getenv("DETECTRON2_DATASETS", "datasets"), _spec)
