from .trainer import Trainer, resolve_seed, setup_drcl2_logger

__all__ = ["Trainer", "resolve_seed", "setup_drcl2_logger"]
