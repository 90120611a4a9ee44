"""What every benchmark shares (``benchmarks/verdict.py``); each benchmark's own end-to-end run is
tested beside the code it measures."""

import pytest


@pytest.mark.parametrize(
    "measured, target, at_least, expected",
    [
        (2.004, 2.0, False, "ok"),  # printed 2.00x beside <= 2.0x
        (2.006, 2.0, False, "MISSED"),  # printed 2.01x
        (1.99, 2.0, False, "ok"),
        (1.996, 2.0, True, "ok"),  # printed 2.00x beside >= 2.0x
        (1.994, 2.0, True, "MISSED"),  # printed 1.99x
        (2.5, 2.0, True, "ok"),
    ],
)
def test_a_verdict_agrees_with_the_figure_its_row_prints(
    benchmarks, measured, target, at_least, expected
):
    verdict = benchmarks("verdict")
    assert verdict.verdict(measured, target, at_least=at_least) == expected
    printed = float(verdict.shown(measured))
    assert (printed >= target if at_least else printed <= target) == (expected == "ok")
