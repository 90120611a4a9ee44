"""
Seeded, equal-compute studies of what 2DRCL pre-training buys (``python -m drcl2.tools.study``):

    spec      the study file (arms, seeds, datasets, schedules, device): load_study
    runner    runs every (arm, seed) through train_net.py, resumable: StudyRunner
    report    results.csv, per_class.csv, summary.md, groups.png, per_class_delta.png: write_report
"""

from .report import write_report
from .runner import StudyRunner
from .spec import Study, StudyFileError, load_study

__all__ = ["load_study", "Study", "StudyFileError", "StudyRunner", "write_report"]
