"""
python -m drcl2.tools.device_check: the GPU day's command, run here as its dry run (the same steps
on the CPU at tiny sizes), so it is known to work before a GPU is lent; and a step that runs out
of time fails the command, named.
"""

import os

from drcl2.tools import device_check


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
