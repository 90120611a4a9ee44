"""
2DRCL modeling: the DRCL2 meta-architecture, its pretext heads (DRCL2_HEAD_REGISTRY), losses,
masking and EMA target network; the one-stage fine-tuning detectors ATSS and (detectron2's) FCOS,
and their P3-P7 backbone.
"""

from .atss import ATSS  # registers the ATSS meta-architecture
from .backbone import build_fcos_resnet_fpn_backbone  # registers the P6/P7-from-P5 ResNet-FPN
from .decorrelation_head import FeatureDecorrelationHead
from .detection_head import SupervisedDetectionHead
from .fcos import FCOS  # registers detectron2's FCOS for yacs configs
from .hcl_head import HolisticContrastiveHead
from .lcl_head import LocalContrastiveHead
from .meta_arch import DRCL2, check_drcl2_config  # registers the DRCL2 meta-architecture
from .pretext_head import DRCL2_HEAD_REGISTRY, PretextHead, StepContext, build_pretext_heads
from .reconstruction_heads import AppearanceReconstructionHead, SemanticReconstructionHead
from .rpn_loss_head import RPNLossHead

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
    "SupervisedDetectionHead",
    "FeatureDecorrelationHead",
    "ATSS",
    "FCOS",
    "build_fcos_resnet_fpn_backbone",
]
