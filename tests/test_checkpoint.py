"""
Checkpoints survive a kill: atomic writes, a resume that falls back to the newest complete
checkpoint, model_final as a hard link, temporary files of killed saves cleaned up.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from fvcore.common.checkpoint import PeriodicCheckpointer
from helpers import REPO_ROOT

from drcl2.checkpoint import AtomicDetectionCheckpointer, atomic_write, is_complete_checkpoint

# A child that saves one checkpoint, then starts a second whose write stalls half-way.
_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from drcl2.checkpoint import AtomicDetectionCheckpointer
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=sys.argv[1])
    checkpointer.save("model_0000001", iteration=1)
    real_save = torch.save

    class Stalling:
        def __init__(self, f):
            self.f, self.calls = f, 0
        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                self.f.flush()
                print("STALLED", flush=True)
                time.sleep(600)
            return self.f.write(b)
        def flush(self):
            return self.f.flush()

    torch.save = lambda obj, f: real_save(obj, Stalling(f))
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save("model_0000002", iteration=2)
    """
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256)


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        assert child.stdout.readline().strip() == "STALLED"
        partial = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert len(partial) == 1 and os.path.getsize(tmp_path / partial[0]) > 0  # killed mid-write
        # another process (an export, an evaluation) building a checkpointer on the same folder
        # leaves the live write alone
        AtomicDetectionCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
        assert (tmp_path / partial[0]).exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    # stock detectron2 would now hold a cut-short model_0000002.pth named in last_checkpoint
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    model = torch.nn.Linear(256, 256)
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    assert not [
        f for f in os.listdir(tmp_path) if f.endswith(".tmp")
    ]  # the partial write is removed
    assert checkpointer.has_checkpoint()
    loaded = checkpointer.resume_or_load("", resume=True)
    assert loaded["iteration"] == 1
    assert torch.equal(model.weight, _model().weight)


def _save(checkpointer, iteration):
    checkpointer.save(f"model_{iteration:07d}", iteration=iteration)


@pytest.mark.parametrize(
    "damage", ["empty", "missing", "names_a_cut_short_file", "names_a_missing_file"]
)
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage, drcl2_log):
    checkpointer = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    _save(checkpointer, 3)
    _save(checkpointer, 7)
    tag = tmp_path / "last_checkpoint"
    newest = 7
    if damage == "empty":
        tag.write_text("")
    elif damage == "missing":
        tag.unlink()
    elif damage == "names_a_cut_short_file":
        data = (tmp_path / "model_0000007.pth").read_bytes()
        (tmp_path / "model_0000009.pth").write_bytes(
            data[: len(data) // 2]
        )  # an in-place write, killed
        tag.write_text("model_0000009.pth")
    else:
        tag.write_text("model_0000011.pth")
    fresh = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    assert fresh.has_checkpoint()
    path = fresh.get_checkpoint_file()
    assert path == str(tmp_path / f"model_{newest:07d}.pth")
    assert "resuming from the newest complete checkpoint" in drcl2_log.text
    assert fresh.resume_or_load("", resume=True)["iteration"] == newest


def test_fallback_ranks_model_final_by_its_iteration(tmp_path):
    """A run extended after its model_final (iteration 9): the fallback takes the newer
    model_0000014."""
    checkpointer = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    _save(checkpointer, 9)
    checkpointer.save("model_final", iteration=9)
    extended = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    _save(extended, 14)
    (tmp_path / "last_checkpoint").write_text("")
    fresh = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    assert [os.path.basename(p) for p in fresh.complete_checkpoints()] == [
        "model_0000009.pth",
        "model_final.pth",
        "model_0000014.pth",
    ]
    assert fresh.get_checkpoint_file() == str(tmp_path / "model_0000014.pth")
    # a model_final that holds no iteration ranks first
    torch.save({"model": _model().state_dict()}, tmp_path / "model_final.pth")
    assert os.path.basename(fresh.complete_checkpoints()[0]) == "model_final.pth"


def test_only_stale_temporary_files_are_removed(tmp_path, drcl2_log):
    from drcl2.checkpoint import STALE_TMP_SECONDS, _tmp_path

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live = _tmp_path(str(tmp_path / "model_0000002.pth"))  # this process: alive
    dead = live.replace(f"-{os.getpid()}-", f"-{int(done.stdout)}-")  # a process that has exited
    other_host = str(tmp_path / ".model_0000003.pth.elsewhere-1-0123456789ab.tmp")
    old_other_host = str(tmp_path / ".model_0000004.pth.elsewhere-1-0123456789ab.tmp")
    legacy_old = str(
        tmp_path / ".last_checkpoint.0123456789ab.tmp"
    )  # the name before writers were recorded
    for path in (live, dead, other_host, old_other_host, legacy_old):
        open(path, "wb").close()
    long_ago = time.time() - STALE_TMP_SECONDS - 60
    for path in (old_other_host, legacy_old):
        os.utime(path, (long_ago, long_ago))
    AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    left = {f for f in os.listdir(tmp_path) if f.endswith(".tmp")}
    assert left == {os.path.basename(live), os.path.basename(other_host)}
    assert (
        "its writer (process" in drcl2_log.text and "nobody has written to it for" in drcl2_log.text
    )


def test_an_intact_last_checkpoint_is_followed(tmp_path):
    checkpointer = AtomicDetectionCheckpointer(_model(), save_dir=str(tmp_path))
    _save(checkpointer, 7)
    _save(checkpointer, 3)  # last_checkpoint names the last save, not the largest iteration
    assert AtomicDetectionCheckpointer(
        _model(), save_dir=str(tmp_path)
    ).get_checkpoint_file() == str(tmp_path / "model_0000003.pth")


def test_model_final_is_not_a_second_copy(tmp_path):
    model = _model()
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    periodic = PeriodicCheckpointer(checkpointer, period=5, max_iter=10)
    for it in range(10):
        periodic.step(it)
    final, last = tmp_path / "model_final.pth", tmp_path / "model_0000009.pth"
    assert os.stat(final).st_ino == os.stat(last).st_ino  # one file on disk, two names
    assert os.stat(tmp_path / "model_0000004.pth").st_ino != os.stat(last).st_ino
    assert torch.load(final, weights_only=False)["iteration"] == 9
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    # a later save at another iteration is a full new file again
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save("model_final", iteration=12)
    assert os.stat(final).st_ino != os.stat(last).st_ino
    assert torch.load(last, weights_only=False)["iteration"] == 9


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "weights.pth"
    atomic_write(str(path), lambda f: torch.save({"a": 1}, f))

    def failing(f):
        f.write(b"PK partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), failing)
    assert torch.load(path, weights_only=False) == {"a": 1}
    assert os.listdir(tmp_path) == ["weights.pth"]


def test_is_complete_checkpoint(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-100])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert is_complete_checkpoint(str(good))
    assert not is_complete_checkpoint(str(cut))
    assert not is_complete_checkpoint(str(empty))
    assert not is_complete_checkpoint(str(tmp_path / "absent.pth"))
