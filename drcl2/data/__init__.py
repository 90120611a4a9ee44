from . import datasets  # registers lvis_v1_toy_*, lvis_v1_gen_large_*, toy_source_* (generated on first use)
from . import coco_lt  # registers coco_lt_train / coco_lt_val (COCO-LT, datasets/prepare_cocolt.py)
from .dataset_check import check_dataset_dicts, check_datasets  # the check before the first step
from .lvis_format import load_lvis_format_json, register_lvis_format
from .proposals import check_proposal_files, label_proposals, read_proposal_file, top_proposals
from .rebalance import (
    RebalanceSchedule,
    class_statistics,
    class_weights,
    repeat_factors,
    sample_instances,
)
from .samplers import DynamicRepeatFactorTrainingSampler
from .toy_lvis import LVIS_GEN_LARGE, ToyLVISSpec, ensure_toy_lvis, generate_toy_lvis
from .toy_source import ToySourceSpec, ensure_toy_source, generate_toy_source
from .two_view_mapper import TwoViewDatasetMapper

__all__ = [
    "register_lvis_format",
    "load_lvis_format_json",
    "check_dataset_dicts",
    "check_datasets",
    "ToyLVISSpec",
    "LVIS_GEN_LARGE",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "ToySourceSpec",
    "generate_toy_source",
    "ensure_toy_source",
    "class_statistics",
    "repeat_factors",
    "class_weights",
    "sample_instances",
    "RebalanceSchedule",
    "DynamicRepeatFactorTrainingSampler",
    "TwoViewDatasetMapper",
    "read_proposal_file",
    "check_proposal_files",
    "top_proposals",
    "label_proposals",
]
