"""2DRCL modeling: the DRCL2 meta-architecture, its pretext heads, losses, masking and EMA target network."""
from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext, build_pretext_heads
from . import hcl_head, lcl_head, reconstruction_heads, rpn_loss_head  # register the built-in heads
from .hcl_head import HolisticContrastiveHead
from .lcl_head import LocalContrastiveHead
from .reconstruction_heads import AppearanceReconstructionHead, SemanticReconstructionHead
from .rpn_loss_head import RPNLossHead
from .meta_arch import DRCL2, check_drcl2_config  # registers the DRCL2 meta-architecture

__all__ = [
    "DRCL2",
    "check_drcl2_config",
    "DRCL2_HEAD_REGISTRY",
    "PretextHead",
    "StepContext",
    "build_pretext_heads",
    "HolisticContrastiveHead",
    "LocalContrastiveHead",
    "AppearanceReconstructionHead",
    "SemanticReconstructionHead",
    "RPNLossHead",
]
