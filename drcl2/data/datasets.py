"""Datasets drcl2 registers on import: the generated toy LVIS v1 set."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .lvis_format import load_lvis_format_json, lvis_format_metadata
from .toy_lvis import ToyLVISSpec, ensure_toy_lvis, toy_lvis_categories, toy_lvis_paths

__all__ = ["register_toy_lvis", "TOY_LVIS_DATASETS"]

TOY_LVIS_DATASETS = {"lvis_v1_toy_train": "train", "lvis_v1_toy_val": "val"}


def register_toy_lvis(root: str, spec: ToyLVISSpec = ToyLVISSpec()) -> None:
    """
    Register ``lvis_v1_toy_train`` / ``lvis_v1_toy_val`` under ``root``. Nothing is read or written
    now: the metadata comes from the generator's layout, and the set is generated under ``root`` the
    first time its dicts are asked for (``DatasetCatalog.get``).
    """
    paths = toy_lvis_paths(root)
    metadata = lvis_format_metadata({"categories": toy_lvis_categories(spec)})

    def load(split):
        ensure_toy_lvis(root, spec)
        return load_lvis_format_json(paths[f"{split}_json"], paths["image_root"])

    for name, split in TOY_LVIS_DATASETS.items():
        DatasetCatalog.register(name, lambda split=split: load(split))
        MetadataCatalog.get(name).set(
            json_file=paths[f"{split}_json"],
            image_root=paths["image_root"],
            evaluator_type="lvis",
            **metadata,
        )


# Like detectron2's builtin datasets: under $DETECTRON2_DATASETS, default ./datasets
if "lvis_v1_toy_train" not in DatasetCatalog.list():
    register_toy_lvis(os.getenv("DETECTRON2_DATASETS", "datasets"))
