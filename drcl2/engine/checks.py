"""
The start-up checks: config mistakes that detectron2 lets through, caught before anything is built,
generated or written (``train_net.py`` runs them before ``config.yaml`` is written; the Trainer runs
them again for users with their own launcher). They read configs and dataset metadata only: no
dataset is loaded or generated here.
"""

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.rebalance import RebalanceSchedule

__all__ = [
    "NUM_CLASSES_KEYS",
    "check_config",
    "check_datasets_registered",
    "check_num_classes",
    "check_training_config",
    "datasets_read",
]

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


def datasets_read(cfg, training: bool = True):
    """
    ``(config key, dataset name)`` of every dataset a run reads: ``DATASETS.TRAIN`` (training
    only), ``DATASETS.TEST``, and the health probe's ``TEST.HEALTH.DATASET`` (training with
    ``TEST.HEALTH.PERIOD > 0``).
    """
    out = [("DATASETS.TRAIN", name) for name in cfg.DATASETS.TRAIN] if training else []
    out += [("DATASETS.TEST", name) for name in cfg.DATASETS.TEST]
    if training and cfg.TEST.HEALTH.PERIOD > 0 and cfg.TEST.HEALTH.DATASET:
        out.append(("TEST.HEALTH.DATASET", cfg.TEST.HEALTH.DATASET))
    return out


def check_datasets_registered(cfg, training: bool = True) -> None:
    """
    Raise detectron2's ``KeyError`` (the name and every registered one) for a dataset the run reads
    that is not registered, naming the config key.
    """
    registered = DatasetCatalog.list()
    for key, name in datasets_read(cfg, training):
        if name not in registered:
            raise KeyError(
                f"{key}: dataset '{name}' is not registered! Available datasets are: "
                f"{', '.join(registered)}. Register your own LVIS-format json with "
                "`train_net.py --dataset NAME JSON IMAGE_ROOT` or drcl2.data.register_lvis_format."
            )


def check_training_config(cfg) -> None:
    """
    Raise ValueError naming the key for training settings that would otherwise fail late or not at
    all: the rebalancing schedule (``DATALOADER.DRCL2.{START, END, MODE}``) when it is used.
    """
    if cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler" or (
        cfg.MODEL.META_ARCHITECTURE == "DRCL2" and cfg.MODEL.DRCL2.DRB.ENABLED
    ):
        RebalanceSchedule.from_config(cfg)


def check_num_classes(cfg, training: bool = True) -> None:
    """
    Refuse a detector whose number of classes is not that of a dataset the run reads (training,
    test and health-probe sets, :func:`datasets_read`): detectron2 trains and evaluates such a
    model silently (a class the data never has scores 0, or a class id past the head's last index
    fails deep in a loss or a probe). A dataset's class count is ``len(thing_classes)`` of its
    metadata (datasets without ``thing_classes`` are skipped); nothing is loaded or generated.

    Raises:
        ValueError: naming both config keys, both numbers and the dataset.
    """
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    num_classes = int(_get(cfg, key))
    for dataset_key, name in datasets_read(cfg, training):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            fix = f"Set {key} {len(classes)}"
            if dataset_key == "TEST.HEALTH.DATASET":
                fix = (
                    "Set TEST.HEALTH.DATASET to a held-out split of the training data, or "
                    "TEST.HEALTH.PERIOD 0 (the probe off)"
                )
            elif dataset_key == "DATASETS.TEST" and training:
                fix += ", or test on a split of the training data"
            raise ValueError(
                f"{key} = {num_classes}, but {dataset_key} '{name}' has {len(classes)} classes "
                f"(its metadata's thing_classes). {fix}."
            )


def check_config(cfg, training: bool = True) -> None:
    """
    Every start-up check of a run (``training`` False: an ``--eval-only`` run, which reads only
    ``DATASETS.TEST``): datasets registered, class counts, the training schedule and the
    meta-architecture's own keys (``DRCL2``: :func:`drcl2.modeling.check_drcl2_config`).

    Raises:
        KeyError, ValueError: naming the config key and how to fix it.
    """
    check_datasets_registered(cfg, training)
    check_num_classes(cfg, training)
    if training:
        check_training_config(cfg)
        if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            from ..modeling.meta_arch import check_drcl2_config

            check_drcl2_config(cfg)
