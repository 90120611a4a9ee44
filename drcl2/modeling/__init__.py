"""2DRCL modeling: the DRCL2 meta-architecture, its heads, losses, masking and EMA target network."""
from .meta_arch import DRCL2, check_drcl2_config  # registers the DRCL2 meta-architecture

__all__ = ["DRCL2", "check_drcl2_config"]
