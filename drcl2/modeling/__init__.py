"""2DRCL modeling: the DRCL2 meta-architecture, its heads, losses, masking and EMA target network;
the one-stage fine-tuning detectors ATSS and (detectron2's) FCOS, and their P3-P7 backbone."""
from .meta_arch import DRCL2, check_drcl2_config  # registers the DRCL2 meta-architecture
from .atss import ATSS  # registers the ATSS meta-architecture
from .fcos import FCOS  # registers detectron2's FCOS for yacs configs
from .backbone import build_fcos_resnet_fpn_backbone  # registers the P6/P7-from-P5 ResNet-FPN

__all__ = ["DRCL2", "check_drcl2_config", "ATSS", "FCOS", "build_fcos_resnet_fpn_backbone"]
