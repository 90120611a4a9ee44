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

Registering them reads, imports and generates nothing: the generator
(:mod:`drcl2.data.generated`) is imported the first time a run asks for a set's metadata or dicts,
and a set is rendered the first time its dicts are asked for (the log says where).
"""

import os
from typing import Iterable

from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .dataset_check import check_datasets
from .lvis_format import load_lvis_format_json, lvis_format_metadata

__all__ = [
    "register_toy_lvis",
    "TOY_LVIS_DATASETS",
    "GENERATED_DATASETS",
    "check_dataset_files",
    "check_datasets_before_training",
    "check_test_dataset",
]


SPLITS = ("train", "val", "test")
# The generated sets drcl2 registers: the key of their spec in
# drcl2.data.generated.toy_lvis.GENERATED_SETS -> their name (the prefix of the dataset names).
GENERATED_SET_NAMES = {
    "toy": "lvis_v1_toy",
    "large": "lvis_v1_gen_large",
    "source": "lvis_v1_toy_source",
}
TOY_LVIS_DATASETS = {f"lvis_v1_toy_{split}": split for split in SPLITS}
# every generated split drcl2 registers: dataset name -> split
GENERATED_DATASETS = {
    f"{name}_{split}": split for name in GENERATED_SET_NAMES.values() for split in SPLITS
}


class _LazyMetadata(Metadata):
    """Metadata whose fields come from ``load()`` the first time one is missing (and asked for)."""

    def __init__(self, name: str, load):
        super().__init__(name=name)
        self.__dict__["_load"] = load  # (not through Metadata's write-once __setattr__)

    def __getattr__(self, key):
        load = self.__dict__.pop("_load", None)
        if load is not None and not key.startswith("__"):
            self.set(**load())
            return getattr(self, key)
        return super().__getattr__(key)


def register_toy_lvis(root: str, spec=None) -> None:
    """
    Register ``<spec.name>_train`` / ``_val`` / ``_test`` (``lvis_v1_toy_*`` by default; ``spec`` a
    :class:`~drcl2.data.generated.toy_lvis.ToyLVISSpec`, or the key of one of
    ``GENERATED_SETS``) under ``root``. Nothing is imported, read or written now: the metadata
    comes from the generator's layout the first time it is asked for, and the set is generated
    under ``root`` the first time its dicts are (``DatasetCatalog.get``; one rendering process per
    CPU core for large sets).
    """
    name = GENERATED_SET_NAMES["toy"] if spec is None else GENERATED_SET_NAMES.get(spec, None)
    name = name or spec.name

    def the_spec():
        from .generated.toy_lvis import GENERATED_SETS

        key = spec or "toy"
        return GENERATED_SETS[key] if isinstance(key, str) else key

    def paths():
        from .generated.toy_lvis import toy_lvis_paths

        return toy_lvis_paths(root, the_spec())

    def metadata(split):
        from .generated.toy_lvis import toy_lvis_categories

        p = paths()
        return dict(
            json_file=p[f"{split}_json"],
            image_root=p["image_root"],
            evaluator_type="lvis",
            **lvis_format_metadata({"categories": toy_lvis_categories(the_spec())}),
        )

    def load(split):
        from .generated.toy_lvis import ensure_toy_lvis

        ensure_toy_lvis(root, the_spec())
        p = paths()
        return load_lvis_format_json(p[f"{split}_json"], p["image_root"])

    for split in SPLITS:
        dataset = f"{name}_{split}"
        DatasetCatalog.register(dataset, lambda split=split: load(split))
        MetadataCatalog[dataset] = _LazyMetadata(dataset, lambda split=split: metadata(split))


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
for _key, _name in GENERATED_SET_NAMES.items():
    if f"{_name}_train" not in DatasetCatalog.list():
        register_toy_lvis(os.getenv("DETECTRON2_DATASETS", "datasets"), _key)
