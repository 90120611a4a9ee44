"""
2DRCL modeling: the DRCL2 meta-architecture (a detector plus pretext heads, with an EMA target
network), the pretext heads (DRCL2_HEAD_REGISTRY), their building blocks, losses, masking and
per-step draws; the one-stage fine-tuning detectors ATSS and (detectron2's) FCOS, and their P3-P7
backbone.
"""

from .atss import ATSS  # registers the ATSS meta-architecture
from .backbone import build_fcos_resnet_fpn_backbone  # registers the P6/P7-from-P5 ResNet-FPN
from .decorrelation_head import FeatureDecorrelationHead
from .fcos import FCOS  # registers detectron2's FCOS for yacs configs
from .hcl_head import HolisticContrastiveHead
from .lcl_head import LocalContrastiveHead
from .meta_arch import DRCL2  # registers the DRCL2 meta-architecture
from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext, build_pretext_heads
from .reconstruction_heads import AppearanceReconstructionHead, SemanticReconstructionHead

__all__ = [
    "DRCL2",
    "DRCL2_HEAD_REGISTRY",
    "PretextHead",
    "StepContext",
    "build_pretext_heads",
    "HolisticContrastiveHead",
    "LocalContrastiveHead",
    "AppearanceReconstructionHead",
    "SemanticReconstructionHead",
    "FeatureDecorrelationHead",
    "ATSS",
    "FCOS",
    "build_fcos_resnet_fpn_backbone",
]
