"""
Make the reference ``lvis`` API (0.5.3, the last release) run on numpy >= 1.24.

``lvis.eval.LVISEval.accumulate`` calls ``astype(dtype=np.float)``; ``np.float`` was removed in
numpy 1.24, so evaluation crashes as soon as there are predictions. Rather than adding the alias to
numpy for the whole process, :func:`patch_lvis_numpy` gives the ``lvis.eval`` module alone a view of
numpy that still has ``float`` (the builtin, which is what ``np.float`` always was).
"""

import types

import numpy as np

__all__ = ["patch_lvis_numpy"]


class _NumpyWithFloatAlias(types.ModuleType):
    """numpy, plus the ``float`` alias that lvis 0.5.3 still uses."""

    float = float

    def __getattr__(self, name):
        return getattr(np, name)


def patch_lvis_numpy():
    """Give ``lvis.eval`` (only) a numpy with ``np.float``. Idempotent; a no-op on old numpy."""
    import lvis.eval

    if not hasattr(lvis.eval.np, "float"):
        lvis.eval.np = _NumpyWithFloatAlias("numpy")
