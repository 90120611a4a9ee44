"""How every benchmark judges a figure against its target: on the figure as its table prints it.

A ratio of 2.004 printed as ``2.00x`` beside a target of ``<= 2.0x`` must read ``ok``; judging the
unrounded value would print a verdict the row itself contradicts.
"""

DECIMALS = 2


def shown(measured):
    """``measured`` as the tables print it (``DECIMALS`` places)."""
    return f"{measured:.{DECIMALS}f}"


def verdict(measured, target, *, at_least=False):
    """``"ok"`` when the printed ``measured`` is within ``target`` (``<=``, or ``>=`` with
    ``at_least``), else ``"MISSED"``."""
    value = float(shown(measured))
    return "ok" if (value >= target if at_least else value <= target) else "MISSED"
