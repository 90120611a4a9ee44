"""
detectron2's FCOS for yacs configs: ``MODEL.META_ARCHITECTURE: "FCOS"`` (keys under ``MODEL.FCOS``).

detectron2 ships FCOS (``detectron2.modeling.meta_arch.fcos``) for its lazy (Python) configs only:
the class has no ``from_config`` and is not registered. This subclass adds exactly that and
changes nothing else: the model, its losses and its inference are detectron2's.
"""

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from .backbone import backbone_feature_shapes

__all__ = ["FCOS"]


@META_ARCH_REGISTRY.register()
class FCOS(_FCOS):
    """:class:`detectron2.modeling.meta_arch.fcos.FCOS`, buildable from a yacs config."""

    @configurable
    def __init__(self, **kwargs):
        """Arguments: as detectron2's ``FCOS``."""
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        feature_shapes = backbone_feature_shapes(
            cfg, backbone, in_features, "MODEL.FCOS.IN_FEATURES"
        )
        head = FCOSHead(
            input_shape=feature_shapes,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            conv_dims=[feature_shapes[0].channels] * cfg.MODEL.FCOS.NUM_CONVS,
            norm=cfg.MODEL.FCOS.NORM,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            "test_score_thresh": cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.FCOS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
