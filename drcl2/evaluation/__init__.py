"""
drcl2's evaluators:

    LVISEvaluator      detectron2's LVIS evaluator on faster-coco-eval's C++ core (or the lvis API:
                       TEST.DRCL2.LVIS_BACKEND), with per-class AP reports and columnar
                       predictions (load_predictions reads its instances_predictions.pth)
    COCOLTEvaluator    COCO metrics plus AP1-AP4 (classes grouped by training instance count)
"""

from .coco_lt_evaluation import COCOLTEvaluator
from .lvis_compat import patch_lvis_numpy
from .lvis_evaluation import LVIS_BACKENDS, LVISEvaluator, evaluate_lvis
from .per_class import write_per_class_report
from .predictions import load_predictions, save_predictions

__all__ = [
    "LVISEvaluator",
    "COCOLTEvaluator",
    "LVIS_BACKENDS",
    "evaluate_lvis",
    "load_predictions",
    "patch_lvis_numpy",
    "save_predictions",
    "write_per_class_report",
]
