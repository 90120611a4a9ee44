"""
python -m drcl2.tools.submit: the job it builds, --dry-run, its refusals, the SLURM environment of
a task, and (slow) a two-machine job run by submitit's LocalExecutor, preempted and requeued.
"""

import os
import pickle
import re
import signal
import time

import pytest
import torch
from helpers import REPO_ROOT

from drcl2.tools import submit

TOY_CONFIG = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
# the toy fine-tuning made tiny: 64-96 px inputs, few proposals, no evaluation
TINY = [
    "MODEL.DEVICE", "cpu",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "DATASETS.TEST", "()",
]  # fmt: skip


def _submit_args(output_dir, *flags, opts=()):
    return [*flags, "--config-file", TOY_CONFIG, *opts, "OUTPUT_DIR", str(output_dir)]


def test_dry_run_prints_the_job_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu"]
    flags += ["--sbatch", "account=proj", "--sbatch", "exclusive"]
    argv = _submit_args(out, *flags, "--time", "01:30:00", opts=["SOLVER.IMS_PER_BATCH", "8"])
    assert submit.main(argv) == 0
    printed = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --requeue",
        "#SBATCH --account=proj",
        "#SBATCH --exclusive\n",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --job-name=drcl2_mask_rcnn_finetune",
        f"#SBATCH --output={out}/slurm/%j_0_log.out",
    ):
        assert line in printed, line
    first, requeued = [line for line in printed.splitlines() if line.startswith("python ")]
    launcher = "--num-gpus 4 --num-machines 2 --machine-rank $SLURM_PROCID"
    assert f"train_net.py --config-file {TOY_CONFIG} {launcher}" in first
    assert first.endswith(f"SOLVER.IMS_PER_BATCH 8 OUTPUT_DIR {out}")
    assert requeued == first.replace(TOY_CONFIG, TOY_CONFIG + " --resume")
    assert "SOLVER.IMS_PER_BATCH 8 = 1 image(s) per process" in printed
    assert not out.exists()  # nothing written, nothing submitted


def test_dry_run_of_an_evaluation_requeues_it_unchanged(tmp_path, capsys):
    argv = _submit_args(
        tmp_path, "--dry-run", "--eval-only", "--time", "45", "--gpus-per-node", "1"
    )
    assert submit.main([*argv, "MODEL.WEIGHTS", "/shared/model_final.pth"]) == 0
    printed = capsys.readouterr().out
    assert "#SBATCH --time=45" in printed
    first, requeued = [line for line in printed.splitlines() if line.startswith("python ")]
    assert "--eval-only" in first and "--resume" not in requeued and requeued == first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "2"], "--config-file is required"),
        (["--config-file", "nowhere.yaml"], "--config-file nowhere.yaml: no such file"),
        (["--nodes", "0", "--config-file", TOY_CONFIG], "--nodes must be at least 1"),
        (["--gpus-per-node", "0", "--config-file", TOY_CONFIG], "--gpus-per-node must be at least"),
        (["--time", "soon", "--config-file", TOY_CONFIG], "--time: 'soon' is not MINUTES"),
        (["--config-file", TOY_CONFIG, "--num-gpus", "8"], "--num-gpus is set by this tool: use"),
        (["--config-file", TOY_CONFIG, "--dist-url", "tcp://a:1"], "--dist-url is set by this"),
        (["--config-file", TOY_CONFIG, "OUTPUT_DIR", ""], "OUTPUT_DIR is empty"),
        (["--sbatch", "qos=", "--config-file", TOY_CONFIG], "--sbatch qos=: expected KEY=VALUE"),
        (["--config-file", TOY_CONFIG, "SOLVER.MAX_ITER"], f"--config-file {TOY_CONFIG} with"),
        (
            ["--nodes", "3", "--gpus-per-node", "1", "--config-file", TOY_CONFIG],
            "SOLVER.IMS_PER_BATCH (4) must be divisible by the job's processes, --nodes x "
            "--gpus-per-node = 3",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        submit.main(["--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_new_run_over_checkpoints_is_refused(tmp_path, capsys):
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    (tmp_path / "model_0000099.pth").write_bytes(b"")
    with pytest.raises(SystemExit):
        submit.main(_submit_args(tmp_path, "--dry-run", "--gpus-per-node", "1"))
    assert (
        "already holds a run's checkpoints (last_checkpoint, model_0000099.pth): add --resume"
        in (capsys.readouterr().err)
    )
    assert submit.main(_submit_args(tmp_path, "--dry-run", "--gpus-per-node", "1", "--resume")) == 0


def test_checkpoint_requeues_the_job_with_resume(tmp_path):
    job = submit.build_job(_submit_args(tmp_path, "--nodes", "2", "--gpus-per-node", "1")).job
    job = pickle.loads(pickle.dumps(job))  # what submitit sends to the cluster
    delayed = job.checkpoint()  # what submitit's signal handler dumps for the next attempt
    assert delayed.function.resume and not job.resume
    assert delayed.function.command() == job.command().replace(TOY_CONFIG, TOY_CONFIG + " --resume")
    assert delayed.function.requeued().command() == delayed.function.command()  # once


class _SlurmTask:
    """The submitit.JobEnvironment of a task: what train_net_args reads."""

    def __init__(self, rank, tasks=2, job_id="4242", hostnames=("gpu-a7", "gpu-a8")):
        self.global_rank, self.num_tasks, self.job_id, self.hostnames = (
            rank,
            tasks,
            job_id,
            hostnames,
        )


def test_each_task_is_one_machine_meeting_at_the_first_host(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = submit.build_job(_submit_args(tmp_path, "--nodes", "2", "--gpus-per-node", "2")).job
    for rank in (0, 1):
        args = job.train_net_args(_SlurmTask(rank))
        assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 2, rank)
        assert args.dist_url == "tcp://gpu-a7:14242" and not args.resume
        assert args.config_file == TOY_CONFIG and args.opts[-2:] == ["OUTPUT_DIR", str(tmp_path)]
    with pytest.raises(RuntimeError, match="one task per machine"):
        job.train_net_args(_SlurmTask(0, tasks=4))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job itself
    assert job.train_net_args(_SlurmTask(1)).resume


def test_submitit_reads_the_slurm_environment(monkeypatch):
    import submitit

    for name, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "31337",
        "SLURM_JOB_NODELIST": "node[003-004]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
    }.items():
        monkeypatch.setenv(name, value)
    env = submitit.JobEnvironment()
    assert (env.global_rank, env.num_tasks) == (1, 2)
    assert submit.dist_url_of_job(env.hostnames, env.job_id) == "tcp://node003:21337"


def test_parse_time():
    assert [submit.parse_time(t) for t in ("90", "01:30:00", "1:00:01", "2-00:00:00")] == [
        90,
        90,
        61,
        2880,
    ]


def _processes_under(pid):
    """The process ids below ``pid`` (children, their children, ...), from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_for(condition, seconds, what, job):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline or job.done():
            logs = "\n".join(
                f"--- task {t.task_id}:\n{(t.stdout() or '')[-3000:]}\n{(t.stderr() or '')[-3000:]}"
                for t in job._sub_jobs or [job]
            )
            job.cancel()
            pytest.fail(f"{what}: not within {seconds} s (job {job.state})\n{logs}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend, so CPU processes cannot form a process group",
)
def test_two_machines_preempted_requeued_and_resumed(toy_lvis_root, tmp_path, monkeypatch):
    """
    submitit's LocalExecutor runs the job as SLURM would, on this machine: each of its 2 tasks is
    one "machine" with one CPU process (gloo). Once the first checkpoint is written, every process
    of the job gets submitit's preemption signal, as SLURM sends it; submitit requeues the job and
    the second attempt resumes from that checkpoint and finishes.
    """
    import submitit

    # the tasks import this checkout's drcl2, and train on one thread each
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    opts = [*TINY, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2"]
    job = submit.build_job(_submit_args(out, "--nodes", "2", "--gpus-per-node", "1", opts=opts)).job
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    # LocalExecutor refuses nodes > 1: its tasks are the machines (rank = machine rank)
    executor.update_parameters(tasks_per_node=2, timeout_min=30)  # a preemption, not a timeout
    started = time.time()
    local_job = executor.submit(job)
    try:
        last = out / "last_checkpoint"
        _wait_for(last.exists, 240, "the first checkpoint", local_job)
        first = out / last.read_text()
        written = first.stat().st_mtime_ns
        for pid in _processes_under(local_job._process.pid):  # the tasks and their processes
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        final = out / "model_final.pth"
        _wait_for(final.exists, 240, "the end of the resumed attempt", local_job)
        local_job.wait()
    finally:
        if not local_job.done():
            local_job.cancel()
    assert local_job.results() == [None, None]  # both tasks of the last attempt succeeded
    seconds = time.time() - started

    task0 = local_job.task(0).stdout()
    assert "Calling checkpoint method" in task0 and "Requeued job" in task0, task0[-3000:]
    log = (out / "log.txt").read_text()
    starts = [int(k) for k in re.findall(r"Starting training from iteration (\d+)", log)]
    # the first attempt stopped at the signal, the second went on from its last checkpoint
    assert starts[0] == 0 and len(starts) == 2 and 2 <= starts[1] < 8, (starts, seconds)
    assert "--resume" in task0.split("Requeued job")[1]  # the command the second attempt ran
    assert "preempted" in task0
    # the training processes ignore the signal (their task stops them): task 1's ended when
    # its peer did, not by the signal
    assert "terminated with signal" not in local_job.task(1).stderr()
    assert torch.load(final, weights_only=False)["iteration"] == 7
    assert first.stat().st_mtime_ns == written  # the checkpoint resumed from was kept as it was
