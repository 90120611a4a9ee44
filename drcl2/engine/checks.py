"""
The start-up checks: config mistakes that detectron2 lets through, caught before anything is built,
generated or written (``train_net.py`` runs them before ``config.yaml`` is written; the Trainer runs
them again for users with their own launcher). They read configs and dataset metadata only: no
dataset is loaded or generated here.
"""

import math

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..modeling.meta_arch import BOX_SOURCES, DRB_TERMS, ONLINE_VIEWS, RPN_TARGETS

__all__ = [
    "NUM_CLASSES_KEYS",
    "check_config",
    "check_datasets_registered",
    "check_drcl2_config",
    "check_num_classes",
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
    ``DATASETS.TEST``): datasets registered, class counts and the
    meta-architecture's keys (``DRCL2``: :func:`check_drcl2_config`; each pretext head checks
    its own keys when it is built).

    Raises:
        KeyError, ValueError: naming the config key and how to fix it.
    """
    check_datasets_registered(cfg, training)
    check_num_classes(cfg, training)
    if training and cfg.MODEL.META_ARCHITECTURE == "DRCL2":
        check_drcl2_config(cfg)


def _fail(key, value, why):
    raise ValueError(f"{key} = {value!r}: {why}")


def check_drcl2_config(cfg) -> None:
    """
    The keys of 2DRCL pre-training that are the model's, the data path's or shared by several
    parts (each pretext head checks its own ``MODEL.DRCL2.<PART>.*`` when it is built), and how they
    must agree with detectron2's keys; raise ValueError naming the key.
    """
    d = cfg.MODEL.DRCL2
    parts = {k: d[k].ENABLED for k in ("HCL", "LCL", "AR", "SR", "RPN", "DET", "DECOR")}
    if not any(parts.values()) and not d.EXTRA_HEADS:
        _fail(
            "MODEL.DRCL2.{HCL,LCL,AR,SR,RPN,DET,DECOR}.ENABLED", parts,
            "every part is off and MODEL.DRCL2.EXTRA_HEADS is empty; enable at least one.",
        )  # fmt: skip
    for key in ("RPN.WEIGHT", "DET.WEIGHT"):
        value = d[key.split(".")[0]][key.split(".")[1]]
        if not (value >= 0 and math.isfinite(value)):
            _fail(f"MODEL.DRCL2.{key}", value, "must be a finite number >= 0.")
    if not 0.0 <= d.BASE_MOMENTUM <= 1.0:
        _fail("MODEL.DRCL2.BASE_MOMENTUM", d.BASE_MOMENTUM, "must lie in [0, 1].")
    for key, value, choices in (
        ("MODEL.DRCL2.MASK.ONLINE_VIEW", d.MASK.ONLINE_VIEW, ONLINE_VIEWS),
        ("MODEL.DRCL2.RPN.TARGETS", d.RPN.TARGETS, RPN_TARGETS),
        ("MODEL.DRCL2.LCL.BOX_SOURCE", d.LCL.BOX_SOURCE, BOX_SOURCES),
    ):
        if value not in choices:
            _fail(key, value, f"must be one of {choices}.")
    if d.DET.ENABLED and not d.RPN.ENABLED:
        _fail(
            "MODEL.DRCL2.DET.ENABLED", True,
            "the detection losses train on the RPN's proposals: set MODEL.DRCL2.RPN.ENABLED True.",
        )  # fmt: skip
    for key, value, minimum in (
        ("LCL.NUM_INSTANCES", d.LCL.NUM_INSTANCES, 1),
        ("LCL.PROPOSAL_TOPK", d.LCL.PROPOSAL_TOPK, 1),
        ("MASK.PATCH_SIZE", d.MASK.PATCH_SIZE, 1),
        ("MLP_HIDDEN_DIM", d.MLP_HIDDEN_DIM, 1),
        ("MLP_OUT_DIM", d.MLP_OUT_DIM, 1),
    ):
        if int(value) != value or value < minimum:
            _fail(f"MODEL.DRCL2.{key}", value, f"must be an integer >= {minimum}.")
    if not 0.0 < d.LCL.PROPOSAL_MATCH_IOU <= 1.0:
        _fail("MODEL.DRCL2.LCL.PROPOSAL_MATCH_IOU", d.LCL.PROPOSAL_MATCH_IOU, "must lie in (0, 1].")
    if not 0.0 <= d.MASK.RATIO < 1.0:
        _fail("MODEL.DRCL2.MASK.RATIO", d.MASK.RATIO, "the masked fraction must lie in [0, 1).")
    if not 0.0 <= d.MASK.BOX_GUIDED <= 1.0:
        _fail("MODEL.DRCL2.MASK.BOX_GUIDED", d.MASK.BOX_GUIDED, "must lie in [0, 1].")
    norms = ("", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "GN", "LN")
    if d.HEAD_NORM not in norms:
        _fail("MODEL.DRCL2.HEAD_NORM", d.HEAD_NORM, f"must be one of {norms} (get_norm names).")
    if not set(d.DRB.APPLY_TO) <= set(DRB_TERMS) or len(set(d.DRB.APPLY_TO)) != len(d.DRB.APPLY_TO):
        _fail(
            "MODEL.DRCL2.DRB.APPLY_TO", d.DRB.APPLY_TO, f"must list distinct terms of {DRB_TERMS}."
        )
    if cfg.SOLVER.MAX_ITER < 1:
        _fail("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, "the momentum and DRB schedules need >= 1.")
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES < 1:
        _fail("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "must be >= 1.")
    # how the parts agree with the data path and detectron2's keys
    dynamic_sampler = cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler"
    if bool(d.DRB.ENABLED) != dynamic_sampler:
        # DRB has two halves, the class weights in the model and the image repeats in the sampler;
        # one without the other is not the method, and its logged lambda would mislead.
        raise ValueError(
            f"MODEL.DRCL2.DRB.ENABLED = {d.DRB.ENABLED} but DATALOADER.SAMPLER_TRAIN = "
            f"{cfg.DATALOADER.SAMPLER_TRAIN!r}: dynamic rebalancing is switched by both together. "
            "Set DRB.ENABLED True with SAMPLER_TRAIN 'DynamicRepeatFactorTrainingSampler', or "
            "DRB.ENABLED False with another sampler (e.g. 'RepeatFactorTrainingSampler')."
        )
    if d.LCL.BOX_SOURCE == "proposals":
        if not cfg.MODEL.LOAD_PROPOSALS:
            _fail(
                "MODEL.LOAD_PROPOSALS", cfg.MODEL.LOAD_PROPOSALS,
                "MODEL.DRCL2.LCL.BOX_SOURCE 'proposals' reads precomputed proposals: set it True "
                "and DATASETS.PROPOSAL_FILES_TRAIN to one file per training set "
                "(python -m drcl2.tools.dump_proposals writes them).",
            )  # fmt: skip
        if len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) != len(cfg.DATASETS.TRAIN):
            _fail(
                "DATASETS.PROPOSAL_FILES_TRAIN", tuple(cfg.DATASETS.PROPOSAL_FILES_TRAIN),
                "MODEL.DRCL2.LCL.BOX_SOURCE 'proposals' needs one proposal file per dataset of "
                f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}.",
            )  # fmt: skip
    if len(cfg.DATASETS.TEST):
        _fail(
            "DATASETS.TEST", tuple(cfg.DATASETS.TEST),
            "DRCL2 pre-training has no inference, so nothing to evaluate (the run would train, "
            "then fail in evaluation and skip the export). Set DATASETS.TEST to (); fine-tune "
            "the exported weights and evaluate the fine-tuned detector.",
        )  # fmt: skip
