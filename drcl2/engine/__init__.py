from .checks import check_config
from .defaults import default_setup, save_config
from .trainer import Trainer, resolve_seed, setup_drcl2_logger

__all__ = [
    "Trainer",
    "check_config",
    "default_setup",
    "save_config",
    "resolve_seed",
    "setup_drcl2_logger",
]
