from .lvis_compat import LVISEvaluator

__all__ = ["LVISEvaluator"]
