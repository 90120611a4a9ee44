"""
python -m drcl2.tools.device_check: the GPU day's command, run here as its dry run (the same steps
on the CPU at tiny sizes), so it is known to work before a GPU is lent; and a step that runs out
of time fails the command, named.
"""

import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from drcl2.tools import device_check


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_the_report(tmp_path, capsys):
    code = device_check.main(["--dry-run", "--work-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert code == 0, printed + report
    assert "every step passed" in printed
    for name in device_check.STEPS:
        assert f"| {name} | ok |" in report
    # the figures each step is there for
    assert "| DRCL2 / Mask R-CNN " in report and "images/s per worker" in report  # step benchmark
    assert "| loss_hcl | 0 | 0 |" in report  # killed and resumed: the same losses
    assert (
        "| scratch | val | bbox |" in report and "| 2drcl | val | bbox |" in report
    )  # the study slice
    # the GPU run's test selection on the emulated device, and the CPU half of the CUDA
    # random-state test
    assert "with DRCL2_TEST_DEVICE=emulated: " in report and " passed" in report
    assert "failed" not in report.split("## tests")[1].split("## ")[0]
    # the study slice's runs are those of the toy study's arms, at 2 iterations
    assert os.path.isfile(
        tmp_path / "study" / "2drcl" / "seed1" / "pretrain" / "model_final_finetune.pth"
    )


def test_a_step_out_of_time_fails_the_command_by_name(tmp_path, capsys):
    code = device_check.main(
        ["--dry-run", "--work-dir", str(tmp_path), "--steps", "env,data", "--limit", "data=0.5"]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED: data (ran out of its 0.5 s)" in printed
    report = (tmp_path / "report.md").read_text()
    assert "| env | ok |" in report and "| data | ran out of its" in report


def test_report_dir_takes_the_report_and_the_logs(tmp_path, capsys):
    """--report-dir: the report and every step's log in a folder of their own (on a lent GPU
    machine, the one it hands back); the runs stay in --work-dir."""
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--work-dir", str(work), "--report-dir", str(out), "--steps", "env,data"]
    code = device_check.main(["--dry-run", *argv, "--limit", "data=0.5"])
    assert code == 1 and "FAILED: data" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| env | ok |" in report and "Last lines of `logs/data.log`" in report
    assert (out / "logs" / "data.log").read_text().startswith("$ ")
    assert not (work / "data.log").exists() and not (work / "report.md").exists()

    # the GPU run's report, named by date and device, in the given folder (no CUDA here: env
    # fails)
    assert device_check.main([*argv[:4], "--steps", "env"]) == 1
    (gpu_report,) = out.glob("20*-*.md")
    assert "| env | no CUDA device" in gpu_report.read_text()


def test_log_dir_apart_from_the_report(tmp_path, capsys):
    work, logs = tmp_path / "work", tmp_path / "logs"
    argv = ["--dry-run", "--work-dir", str(work), "--log-dir", str(logs), "--steps", "data"]
    assert device_check.main([*argv, "--limit", "data=0.5"]) == 1
    assert (logs / "data.log").is_file() and not (work / "data.log").exists()
    assert f"Last lines of `{logs / 'data.log'}`" in (work / "report.md").read_text()


def test_the_dry_run_tests_the_gpu_runs_selection_on_the_emulated_device():
    assert set(device_check.GPU_TESTS) <= set(device_check.DRY_TESTS)


@pytest.mark.slow
def test_the_dry_runs_tests_step_fails_on_a_test_that_would_fail_on_a_gpu(
    tmp_path, capsys, monkeypatch
):
    """A test comparing a tensor of the model's device with one made on the host passes on the
    CPU; the dry run's tests step (the emulated device) fails on it, as the GPU run would."""
    example = "tests/tools/device_mix_example.py"
    on_cpu = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", example],
        cwd=REPO_ROOT,
        env=dict(os.environ, DRCL2_TEST_DEVICE="cpu"),
        capture_output=True,
        text=True,
    )
    assert on_cpu.returncode == 0, on_cpu.stdout
    monkeypatch.setattr(device_check, "DRY_TESTS", [example])
    code = device_check.main(["--dry-run", "--work-dir", str(tmp_path), "--steps", "tests"])
    assert code == 1 and "FAILED: tests (exit status 1)" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "DRCL2_TEST_DEVICE=emulated: 1 failed" in report
    assert "EmulatedDeviceError" in report


def test_the_gpu_limits_fit_one_command_of_a_lent_machine():
    """The steps' GPU limits plus the install (under a minute) leave a minute of the 10 a lent
    machine gives one command; each limit is sized in the comment above LIMITS."""
    assert sum(gpu for gpu, _ in device_check.LIMITS.values()) + 60 <= 9 * 60
    assert set(device_check.LIMITS) == set(device_check.STEPS)
