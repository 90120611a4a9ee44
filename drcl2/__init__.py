"""drcl2 — 2DRCL pre-training for long-tailed object detection, as a detectron2 plugin.

Where things live:
    drcl2.config       add_drcl2_config(cfg): every drcl2 config key, with its default;
                       load_config(file, opts): detectron2's defaults, drcl2's keys, file, opts
    drcl2.data         the data path: LVIS-format datasets (register_lvis_format), the registered
                       datasets and their checks, COCO-LT, the dynamic rebalancing sampler and
                       maths, TwoViewDatasetMapper (its OpenCV / NumPy augmentation ops:
                       drcl2.data.view_ops), precomputed proposals as LCL's boxes (proposals.py),
                       the resumable training loader
    drcl2.data.generated  generators of the demo, study and test sets (not the data path): the toy
                       and large LVIS-format sets, the toy source set, synthetic LVIS data for tests
    drcl2.engine       Trainer: DefaultTrainer for 2DRCL pre-training and long-tail fine-tuning
    drcl2.evaluation   LVISEvaluator (faster-coco-eval, per-class AP report, columnar predictions:
                       load_predictions), COCOLTEvaluator (AP1-AP4)
    drcl2.modeling     the DRCL2 pre-training meta-architecture (a detector, an EMA target, the
                       pretext heads HCL, LCL, AR, SR, DECOR; DRCL2_HEAD_REGISTRY for your own);
                       the one-stage fine-tuning detectors ATSS and FCOS (yacs-configurable)
    drcl2.export       export_finetune_weights(src, dst): pre-training checkpoint -> fine-tuning
    drcl2.checkpoint   atomic_write and the crash-safe checkpointers
    drcl2.study        seeded, equal-compute studies: the study file, the runner, the report
                       (python -m drcl2.tools.study)
    drcl2.utils        seeding (one way to derive seeds), pictures of the pre-training views and of
                       a detector's predictions
                       (python -m drcl2.tools.visualize, VIS_PERIOD)
    drcl2.tools        command lines: python -m drcl2.tools.<name> (export_weights, dump_proposals,
                       visualize, ...)
"""

from . import (
    data,  # noqa: F401  (registers the generated LVIS-format sets and COCO-LT)
    modeling,  # noqa: F401  (registers the DRCL2, ATSS and FCOS meta-architectures)
)
from .config import add_drcl2_config
from .data import register_lvis_format
from .engine import Trainer, setup_drcl2_logger
from .evaluation import COCOLTEvaluator, LVISEvaluator
from .export import export_finetune_weights
from .modeling import DRCL2

__all__ = [
    "add_drcl2_config",
    "register_lvis_format",
    "Trainer",
    "setup_drcl2_logger",
    "LVISEvaluator",
    "COCOLTEvaluator",
    "DRCL2",
    "export_finetune_weights",
]
