"""
The ResNet-FPN backbone of FCOS and ATSS: P3-P7, with P6 / P7 computed from the FPN's P5 output.

detectron2's ``build_retinanet_resnet_fpn_backbone`` (RetinaNet) computes P6 from C5 (``res5``);
FCOS (Tian et al., Sec. 2.2 of the journal version) and ATSS (Zhang et al.; its code's
``USE_C5: False``) compute it from P5, as detectron2's own lazy FCOS config does
(``model.backbone.top_block.in_feature = "p5"``). The yacs config has no key for that choice, hence
this registered builder: ``MODEL.BACKBONE.NAME: "build_fcos_resnet_fpn_backbone"``.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_fcos_resnet_fpn_backbone", "backbone_feature_shapes"]


def backbone_feature_shapes(cfg, backbone, in_features, key: str):
    """
    The :class:`ShapeSpec` of each of ``in_features`` in ``backbone``'s outputs, in order; a
    feature the backbone does not output raises ValueError naming the config ``key``.
    """
    shapes = backbone.output_shape()
    in_features = list(in_features)
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"{key} {in_features} names {missing}, which the backbone "
            f"({cfg.MODEL.BACKBONE.NAME}) does not output; it outputs {sorted(shapes)}."
        )
    return [shapes[f] for f in in_features]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    A ResNet + FPN over ``MODEL.FPN.IN_FEATURES`` (``res3``-``res5`` in the FCOS / ATSS configs)
    with a :class:`LastLevelP6P7` top block that reads P5 (``OUT_CHANNELS`` -> ``OUT_CHANNELS``).

    Returns:
        FPN: outputs ``p3``-``p7`` (strides 8-128) for ``IN_FEATURES`` ``res3``-``res5``.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if "res5" not in in_features:
        raise ValueError(
            f"build_fcos_resnet_fpn_backbone computes P6/P7 from P5: MODEL.FPN.IN_FEATURES must "
            f"include 'res5', got {list(in_features)}."
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
