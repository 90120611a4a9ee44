"""
The set-up of a run from the command line (``train_net.py``): detectron2's ``default_setup``, with
the config written to ``OUTPUT_DIR/config.yaml`` only once the run has been accepted.
"""

import logging
import os

import torch
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..checkpoint import atomic_write

__all__ = ["default_setup", "save_config"]

logger = logging.getLogger("detectron2")


def default_setup(cfg, args) -> None:
    """
    detectron2's :func:`~detectron2.engine.default_setup` (loggers to the console and
    ``OUTPUT_DIR/log.txt``, environment, arguments and config in the log, seeds, cuDNN benchmark),
    except that it does not write ``OUTPUT_DIR/config.yaml``: :func:`save_config` does, after the
    start-up checks, so that a start that is refused leaves an existing run's config as it was.
    """
    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        PathManager.mkdirs(output_dir)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info())
    logger.info(f"Command line arguments: {args}")
    if getattr(args, "config_file", ""):
        with PathManager.open(args.config_file, "r") as f:
            logger.info(f"Contents of args.config_file={args.config_file}:\n{f.read()}")
    logger.info(f"Running with full config:\n{cfg.dump()}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def save_config(cfg) -> None:
    """Write ``OUTPUT_DIR/config.yaml`` (main process; atomically: the old one or the new one)."""
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        atomic_write(path, lambda f: f.write(cfg.dump()), mode="w")
        logger.info(f"Full config saved to {path}")
