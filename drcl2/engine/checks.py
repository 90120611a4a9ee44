"""Config mistakes that detectron2 lets through, caught when the Trainer starts."""

from detectron2.data import MetadataCatalog

from ..data.rebalance import RebalanceSchedule

__all__ = ["NUM_CLASSES_KEYS", "check_training_config", "check_num_classes"]

NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "DRCL2": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "ATSS": "MODEL.ATSS.NUM_CLASSES",
    "FCOS": "MODEL.FCOS.NUM_CLASSES",
}
"""The config key of each meta-architecture's number of classes (others are not checked)."""


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_training_config(cfg) -> None:
    """
    Raise ValueError naming the key for training settings that would otherwise fail late or not at
    all: the rebalancing schedule (``DATALOADER.DRCL2.{START, END, MODE}``) when it is used.
    """
    if cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler" or (
        cfg.MODEL.META_ARCHITECTURE == "DRCL2" and cfg.MODEL.DRCL2.DRB.ENABLED
    ):
        RebalanceSchedule.from_config(cfg)


def check_num_classes(cfg) -> None:
    """
    Refuse to train a detector whose number of classes is not the training set's: detectron2
    trains and evaluates such a model silently (a class the data never has scores 0, or a class id
    past the head's last index fails deep in a loss).

    The training set's class count is ``len(thing_classes)`` of each ``DATASETS.TRAIN`` entry's
    metadata (datasets without ``thing_classes`` are skipped).

    Raises:
        ValueError: naming the config key, both numbers and the dataset.
    """
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    num_classes = int(_get(cfg, key))
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"{key} = {num_classes}, but the training dataset '{name}' has {len(classes)} "
                f"classes (its metadata's thing_classes). Set {key} {len(classes)}."
            )
