from . import datasets  # registers lvis_v1_toy_* and lvis_v1_gen_large_* (generated on first use)
from . import coco_lt  # registers coco_lt_train / coco_lt_val (COCO-LT, datasets/prepare_cocolt.py)
from .lvis_format import load_lvis_format_json, register_lvis_format
from .rebalance import (
    RebalanceSchedule,
    class_statistics,
    class_weights,
    repeat_factors,
    sample_instances,
)
from .samplers import DynamicRepeatFactorTrainingSampler
from .toy_lvis import LVIS_GEN_LARGE, ToyLVISSpec, ensure_toy_lvis, generate_toy_lvis
from .two_view_mapper import TwoViewDatasetMapper

__all__ = [
    "register_lvis_format",
    "load_lvis_format_json",
    "ToyLVISSpec",
    "LVIS_GEN_LARGE",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "class_statistics",
    "repeat_factors",
    "class_weights",
    "sample_instances",
    "RebalanceSchedule",
    "DynamicRepeatFactorTrainingSampler",
    "TwoViewDatasetMapper",
]
