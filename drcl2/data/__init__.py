"""
drcl2's data path: how a training batch is fed.

    lvis_format        LVIS-format json -> detectron2 dicts (register_lvis_format), frequency groups
    datasets           the datasets drcl2 registers on import, and the checks run before the first
                       step
    dataset_check      those checks (check_datasets): missing files, unknown categories, dropped
                       boxes
    coco_lt            COCO-LT (coco_lt_train / coco_lt_val)
    rebalance          DRB's maths: class statistics, repeat factors, class weights, instance
                       sampling
    samplers           DynamicRepeatFactorTrainingSampler (DRB's image-level resampling)
    two_view_mapper    TwoViewDatasetMapper: one image -> 2DRCL's two views (ops: view_ops)
    proposals          precomputed proposals as LCL's boxes
    resumable_loader   a training loader that a checkpoint resumes exactly (same views, same
                       batches)
    generated/         generators of the demo, study and test sets (not part of the data path)
"""

# registers coco_lt_train / coco_lt_val (COCO-LT, datasets/prepare_coco_lt.py)
# registers lvis_v1_toy_*, lvis_v1_toy_source_*, lvis_v1_gen_large_* (generated on first use)
from . import (
    coco_lt,  # noqa: F401
    datasets,  # noqa: F401
)
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
from .two_view_mapper import TwoViewDatasetMapper

__all__ = [
    "register_lvis_format",
    "load_lvis_format_json",
    "check_dataset_dicts",
    "check_datasets",
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
