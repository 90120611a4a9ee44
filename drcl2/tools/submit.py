"""
Submit train_net.py to a SLURM cluster with submitit: one task per machine, each running
train_net's ``main`` through detectron2's ``launch()`` on its GPUs.

    python -m drcl2.tools.submit --dry-run --nodes 2 --gpus-per-node 8 --partition PART \\
        --time 72:00:00 --config-file configs/pretrain_2drcl.yaml \\
        OUTPUT_DIR /shared/output/pretrain_2drcl
    python -m drcl2.tools.submit --nodes 2 --gpus-per-node 8 --partition PART --time 72:00:00 \\
        --config-file configs/pretrain_2drcl.yaml OUTPUT_DIR /shared/output/pretrain_2drcl
    python -m drcl2.tools.submit --nodes 1 --gpus-per-node 8 --config-file CFG --eval-only \\
        MODEL.WEIGHTS /shared/output/run/model_final.pth OUTPUT_DIR /shared/output/run

Everything from ``--config-file`` on is train_net.py's command line (``--config-file``,
``--eval-only``, ``--resume``, then ``KEY VALUE`` overrides); the launcher flags (``--num-gpus``,
``--num-machines``, ``--machine-rank``, ``--dist-url``) are set by this tool. ``--dry-run`` prints
the sbatch script submitit would write and the train_net.py command of each task, and submits
nothing.

Each task is one machine: its rank in the job is the machine rank, and all tasks meet at
``tcp://<first host of the job>:<port derived from the job id>``. When SLURM preempts the job or
it reaches ``--time``, submitit's signal makes the first task requeue it, and the next attempt runs
train_net.py with ``--resume``: it goes on from ``OUTPUT_DIR/last_checkpoint`` (the iterations
since the last checkpoint are done again). OUTPUT_DIR must be a folder every node (and every
attempt, which may land on other nodes) sees: a shared file system. See docs/DISTRIBUTED.md.
"""

import argparse
import copy
import ctypes
import glob
import multiprocessing
import os
import re
import shlex
import signal
import socket
import sys

import submitit

__all__ = ["TrainNetJob", "build_job", "dist_url_of_job", "main", "parse_time"]

LAUNCHER_FLAGS = {
    "--num-gpus": "--gpus-per-node",
    "--num-machines": "--nodes",
    "--machine-rank": "--nodes (each task's rank comes from SLURM)",
    "--dist-url": "--nodes (the URL is derived from the job)",
}
"""train_net.py's launcher flags, which this tool sets, and the flag that sets each."""

NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def dist_url_of_job(hostnames, job_id) -> str:
    """
    The address every task of a job derives on its own: the job's first host, and a port in
    10000-29999 from the job id (the same for a requeued attempt, which keeps its id).
    """
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return f"tcp://{hostnames[0]}:{10000 + int(digits) % 20000}"


def parse_time(text: str) -> int:
    """A SLURM time limit, ``MINUTES``, ``HH:MM:SS`` or ``D-HH:MM:SS``, in whole minutes."""
    text = str(text).strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
    if not m:
        raise ValueError(f"'{text}' is not MINUTES, HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return days * 1440 + hours * 60 + minutes + (seconds > 0)


def _preemption_signal():
    """The signal submitit asks SLURM to send before the time limit (USR2 unless configured)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def _end_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGTERM when its parent ends (detectron2's launch leaves this)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent_pid:  # the parent ended before the call
        os._exit(1)


def _load_train_net(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_train_net(train_net: str, args, task_pid: int):
    """train_net.py's ``main(args)``, in the task's process or in one that ``launch()`` started."""
    if os.getpid() != task_pid:
        # SLURM signals every process of the job; the task's own process handles preemption
        # (TrainNetJob.checkpoint stops this one), so a worker ignores the signal and ends with it.
        signal.signal(_preemption_signal(), signal.SIG_IGN)
        _end_with_parent(task_pid)
    return _load_train_net(train_net).main(args)


class TrainNetJob:
    """
    What each task of a submitted job runs: ``train_net.py``'s ``main`` through detectron2's
    ``launch()``, with ``num_gpus_per_machine`` processes on this machine, ``num_machines`` in all.
    The task's rank in the job is its machine rank (one task per machine) and the process group
    meets at :func:`dist_url_of_job`. Picklable: submitit sends it to the cluster.

    On preemption or timeout submitit calls :meth:`checkpoint` in the first task, which stops the
    task's training processes and requeues :meth:`requeued`: the same job with ``--resume``.
    """

    def __init__(
        self,
        train_net: str,
        config_file: str,
        opts=(),
        *,
        num_machines: int = 1,
        num_gpus_per_machine: int = 1,
        eval_only: bool = False,
        resume: bool = False,
    ):
        self.train_net = train_net
        self.config_file = config_file
        self.opts = list(opts)
        self.num_machines = int(num_machines)
        self.num_gpus_per_machine = int(num_gpus_per_machine)
        self.eval_only = bool(eval_only)
        self.resume = bool(resume)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_task_pid", None)  # which process runs it: not part of the job
        return state

    def requeued(self) -> "TrainNetJob":
        """
        The job a requeued attempt runs: with ``--resume``, so that training goes on from
        OUTPUT_DIR's last checkpoint. An evaluation (``--eval-only``) runs again unchanged (with
        ``--resume`` it would evaluate OUTPUT_DIR's last checkpoint instead of MODEL.WEIGHTS).
        """
        job = copy.copy(self)  # through __getstate__: not the process that runs this one
        job.resume = self.resume or not self.eval_only
        return job

    def command(self, machine_rank="$SLURM_PROCID", dist_url="tcp://FIRST_NODE:PORT") -> str:
        """The train_net.py command line a task runs (``launch()`` in-process, same arguments)."""
        head = ["python", self.train_net, "--config-file", self.config_file]
        head += ["--eval-only"] * self.eval_only + ["--resume"] * self.resume
        head += ["--num-gpus", str(self.num_gpus_per_machine)]
        head += ["--num-machines", str(self.num_machines)]
        return " ".join(
            [shlex.join(head), "--machine-rank", str(machine_rank), "--dist-url", dist_url]
            + [shlex.quote(str(o)) for o in self.opts]
        )

    def train_net_args(self, env=None) -> argparse.Namespace:
        """
        train_net.py's arguments in the task ``env`` (a ``submitit.JobEnvironment``, default this
        process's): machine rank and address from the job. An attempt that SLURM itself requeued
        (node failure, preemption without submitit's signal; ``SLURM_RESTART_COUNT`` > 0) resumes
        too.
        """
        from detectron2.engine import default_argument_parser

        env = submitit.JobEnvironment() if env is None else env
        if env.num_tasks != self.num_machines:
            raise RuntimeError(
                f"This job runs {env.num_tasks} tasks for {self.num_machines} machines: submit it "
                "with one task per machine (python -m drcl2.tools.submit does)."
            )
        resume = self.resume
        if not self.eval_only and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            resume = True
        argv = ["--config-file", self.config_file, *(["--eval-only"] * self.eval_only)]
        args = default_argument_parser().parse_args(argv + ["--resume"] * resume + self.opts)
        args.num_gpus = self.num_gpus_per_machine
        args.num_machines = self.num_machines
        args.machine_rank = env.global_rank
        args.dist_url = dist_url_of_job(env.hostnames, env.job_id)
        return args

    def __call__(self):
        from detectron2.engine import launch

        env = submitit.JobEnvironment()
        args = self.train_net_args(env)
        self._task_pid = os.getpid()
        shown = self.requeued() if args.resume and not self.resume else self
        command = shown.command(args.machine_rank, args.dist_url)
        print(f"[drcl2.tools.submit] {env} on {socket.gethostname()}: {command}", flush=True)
        return launch(
            _run_train_net,
            self.num_gpus_per_machine,
            num_machines=self.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(self.train_net, args, self._task_pid),
        )

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on preemption / timeout: stop training here, requeue with --resume."""
        self._stop_workers()
        return submitit.helpers.DelayedSubmission(self.requeued())

    def _stop_workers(self, timeout: float = 30.0) -> None:
        """End the processes ``launch()`` started for this task (none when it trains in-process)."""
        if getattr(self, "_task_pid", None) != os.getpid():
            return  # not the process running this job (e.g. a test calling checkpoint())
        workers = multiprocessing.active_children()
        for p in workers:
            p.terminate()
        for p in workers:
            p.join(timeout)
            if p.is_alive():
                p.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    job = parser.add_argument_group("the SLURM job")
    job.add_argument("--nodes", type=int, default=1, help="machines (one task each); default 1")
    job.add_argument(
        "--gpus-per-node",
        type=int,
        default=8,
        help="GPUs of each machine = its training processes (train_net's --num-gpus); default 8",
    )
    job.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    job.add_argument(
        "--time",
        default="24:00:00",
        help="time limit of one attempt: MINUTES, HH:MM:SS or D-HH:MM:SS (default 24:00:00); "
        "at the limit the job is requeued and resumes",
    )
    job.add_argument("--job-name", default=None, help="default: drcl2_<config file name>")
    job.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="CPUs of each machine (default: gpus-per-node x (DATALOADER.NUM_WORKERS + 1))",
    )
    job.add_argument(
        "--mem-gb", type=int, default=None, help="memory of each machine (default: the cluster's)"
    )
    job.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, repeatable: --sbatch account=proj --sbatch qos=high "
        "--sbatch constraint=volta32gb --sbatch exclusive",
    )
    job.add_argument(
        "--slurm-dir",
        default=None,
        metavar="DIR",
        help="submitit's folder: the sbatch script, the pickled job, each task's stdout and stderr "
        "(default: OUTPUT_DIR/slurm)",
    )
    job.add_argument(
        "--max-timeouts",
        type=int,
        default=10,
        help="how many times a job that reaches --time is requeued (default 10; preemptions do "
        "not count)",
    )
    job.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script and each task's train_net.py command; submit nothing",
    )
    train = parser.add_argument_group("train_net.py")
    train.add_argument("--config-file", default="", metavar="FILE", help="the config to run")
    train.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    train.add_argument(
        "--resume", action="store_true", help="go on from OUTPUT_DIR/last_checkpoint"
    )
    for flag in LAUNCHER_FLAGS:
        train.add_argument(flag, default=None, help=argparse.SUPPRESS)
    train.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs (last)"
    )
    return parser


def _load_config(config_file: str, opts):
    from ..config import load_config

    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg


def _existing_checkpoints(output_dir: str):
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "model_*.pth")))
    if os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        names.insert(0, "last_checkpoint")
    return names


def build_job(argv=None) -> argparse.Namespace:
    """
    Parse and check a submit command line (``parser.error`` on bad input, naming the flag).
    Returns its arguments with ``job`` (the :class:`TrainNetJob`), ``slurm_parameters``
    (submitit's ``SlurmExecutor`` parameters), ``output_dir`` and ``cfg`` (the config as the
    trainer will see it, scaled by ``SOLVER.REFERENCE_WORLD_SIZE`` to the job's processes).
    """
    from detectron2.engine import DefaultTrainer

    from ..study.runner import train_net_path

    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, instead in LAUNCHER_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            parser.error(f"{flag} is set by this tool: use {instead}.")
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            parser.error(f"{flag} must be at least 1 (got {value}).")
    for flag, value in (("--cpus-per-task", args.cpus_per_task), ("--mem-gb", args.mem_gb)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1 (got {value}).")
    extra = {}
    for option in args.sbatch:
        key, sep, value = option.partition("=")
        if not key.strip("- ") or (sep and not value):
            parser.error(f"--sbatch {option}: expected KEY=VALUE or KEY, e.g. account=proj.")
        extra[key.strip("- ").replace("-", "_")] = value if sep else True  # KEY: a bare flag
    if args.max_timeouts < 0:
        parser.error(f"--max-timeouts must be 0 or more (got {args.max_timeouts}).")
    try:
        args.time_min = parse_time(args.time)
    except ValueError as e:
        parser.error(f"--time: {e}.")
    if args.time_min < 1:
        parser.error(f"--time must be at least 1 minute (got {args.time}).")
    if not args.config_file:
        parser.error("--config-file is required: the train_net.py config the job runs.")
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file}: no such file.")
    try:
        cfg = _load_config(args.config_file, args.opts)
    except Exception as e:  # yacs / detectron2 errors: unknown key, odd number of overrides, ...
        parser.error(f"--config-file {args.config_file} with {args.opts}: {type(e).__name__}: {e}")
    if not cfg.OUTPUT_DIR:
        parser.error(
            "OUTPUT_DIR is empty: set it (in --config-file or as OUTPUT_DIR DIR at the end) to a "
            "folder on a file system every node sees; all processes read and write it."
        )
    args.output_dir = os.path.abspath(cfg.OUTPUT_DIR)
    world = args.nodes * args.gpus_per_node
    args.reference_world_size = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if not args.eval_only:
        try:
            cfg = DefaultTrainer.auto_scale_workers(cfg, world)
        except AssertionError as e:
            parser.error(f"SOLVER.REFERENCE_WORLD_SIZE: {e}")
        if cfg.SOLVER.IMS_PER_BATCH % world != 0:
            parser.error(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the job's "
                f"processes, --nodes x --gpus-per-node = {world}."
            )
        existing = _existing_checkpoints(args.output_dir)
        if existing and not args.resume:
            parser.error(
                f"OUTPUT_DIR {args.output_dir} already holds a run's checkpoints "
                f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}): add --resume "
                "to go on with it, or choose another OUTPUT_DIR (a new run would overwrite them)."
            )
    args.cfg = cfg
    if args.output_dir.startswith(tuple(d + os.sep for d in NODE_LOCAL_DIRS)):
        print(
            f"warning: OUTPUT_DIR {args.output_dir} is usually local to each machine; every node "
            "and every requeued attempt must see the same folder (a shared file system).",
            file=sys.stderr,
        )

    opts = list(args.opts)
    if cfg.OUTPUT_DIR != args.output_dir:
        opts += ["OUTPUT_DIR", args.output_dir]  # the same folder whatever a task's directory
    args.job = TrainNetJob(
        os.path.abspath(train_net_path()),
        os.path.abspath(args.config_file),
        opts,
        num_machines=args.nodes,
        num_gpus_per_machine=args.gpus_per_node,
        eval_only=args.eval_only,
        resume=args.resume,
    )
    args.slurm_dir = os.path.abspath(args.slurm_dir or os.path.join(args.output_dir, "slurm"))
    params = dict(
        job_name=args.job_name
        or "drcl2_" + os.path.splitext(os.path.basename(args.config_file))[0],
        nodes=args.nodes,
        ntasks_per_node=1,  # one task per machine: detectron2's launch() starts its processes
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or args.gpus_per_node * (cfg.DATALOADER.NUM_WORKERS + 1),
        time=args.time_min,
        # SLURM may requeue it too (node failure, preemption): the next attempt resumes then too
        additional_parameters={"requeue": True, **extra},
    )
    if cfg.MODEL.DEVICE == "cpu":
        del params["gpus_per_node"]  # --gpus-per-node CPU processes, no GPU to ask for
    if args.partition:
        params["partition"] = args.partition
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    args.slurm_parameters = params
    return args


def describe(args) -> str:
    """What ``--dry-run`` prints: the sbatch script, each task's command, the world."""
    from submitit.slurm.slurm import _make_sbatch_string

    job, solver = args.job, args.cfg.SOLVER
    python = shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(args.slurm_dir)}"
    world = job.num_machines * job.num_gpus_per_machine
    lines = [
        f"# Dry run, nothing submitted. The sbatch script submitit would write ({args.slurm_dir}):",
        _make_sbatch_string(command=command, folder=args.slurm_dir, **args.slurm_parameters),
        f"# Each of the {job.num_machines} task(s), one per machine, runs train_net.py's main "
        f"through detectron2's launch() ({job.num_gpus_per_machine} process(es) per machine):",
        job.command(),
        f"# $SLURM_PROCID: the task's rank, 0 to {job.num_machines - 1}, is its machine rank; "
        "FIRST_NODE: the first host of the job; PORT: 10000 + job id % 20000.",
        "# After a preemption or a timeout the job is requeued, and each task runs:",
        job.requeued().command(),
        f"# {job.num_machines} machine(s) x {job.num_gpus_per_machine} = {world} processes.",
    ]
    if not job.eval_only:
        per_process = solver.IMS_PER_BATCH // world
        scaled = (
            f" (scaled by detectron2 from SOLVER.REFERENCE_WORLD_SIZE {args.reference_world_size})"
            if args.reference_world_size not in (0, world)
            else ""
        )
        lines.append(
            f"# SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH} = {per_process} image(s) per process, "
            f"SOLVER.BASE_LR {solver.BASE_LR:g}, SOLVER.MAX_ITER {solver.MAX_ITER}{scaled}."
        )
    lines.append(
        f"# OUTPUT_DIR {args.output_dir}: one folder that every node sees (a shared file system); "
        "the first process writes the checkpoints there, every process resumes from them."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_job(argv)
    if args.dry_run:
        print(describe(args))
        return 0
    try:
        executor = submitit.SlurmExecutor(folder=args.slurm_dir, max_num_timeout=args.max_timeouts)
    except RuntimeError as e:
        print(
            f"error: {e} This tool submits to SLURM: run it on a machine of the cluster "
            "(--dry-run shows the job anywhere).",
            file=sys.stderr,
        )
        return 1
    executor.update_parameters(**args.slurm_parameters)
    job = executor.submit(args.job)
    print(f"Submitted job {job.job_id}: {args.job.command()}")
    print(f"Its logs: {args.slurm_dir}; its output: {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
