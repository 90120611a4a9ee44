"""Every config file under configs/ loads through train_net.setup() (Base-*.yaml files excluded);
the study files directly under configs/study/ load through drcl2.study.load_study instead
(tests/study/test_study.py)."""

import os

import pytest
from detectron2.engine import default_argument_parser
from helpers import CONFIGS, REPO_ROOT, STUDIES

import train_net


def _setup(config_file, output_dir, *opts):
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO_ROOT, config_file),
            "OUTPUT_DIR",
            str(output_dir),
            *opts,
        ]
    )
    return train_net.setup(args)


def test_configs_are_found():
    assert "configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml" in CONFIGS
    assert "configs/toy/mask_rcnn_finetune.yaml" in CONFIGS
    assert "configs/large/pretrain_2drcl_R_50_FPN.yaml" in CONFIGS
    assert "configs/study/toy_init.yaml" in STUDIES and STUDIES[0].startswith("configs/study/")


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_loads(config_file, tmp_path):
    from drcl2.engine import save_config

    output_dir = tmp_path / "configs"
    cfg = _setup(config_file, output_dir)  # with the start-up checks
    assert cfg.VERSION == 2
    assert not os.path.exists(output_dir / "config.yaml")  # written once the run is accepted ...
    save_config(cfg)
    assert (output_dir / "config.yaml").read_text() == cfg.dump()  # ... by save_config
    if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
        from drcl2.engine.checks import check_drcl2_config

        check_drcl2_config(cfg)  # e.g. DRB's two switches (class weights, sampler) agree


def test_lvis_recipe():
    from detectron2.config import get_cfg

    from drcl2 import add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/LVISv1/mask_rcnn_R_101_FPN_1x.yaml"))
    assert cfg.MODEL.RESNETS.DEPTH == 101
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-4)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.001)
    assert cfg.DATASETS.TRAIN == ("lvis_v1_train",)


@pytest.mark.parametrize(
    "arch, key", [("atss", "ATSS"), ("retinanet", "RETINANET"), ("fcos", "FCOS")]
)
def test_lvis_recipe_one_stage(arch, key):
    """The one-stage LVIS configs: the LVIS recipe of the Mask R-CNN ones, and their detector."""
    cfg = _merged(f"configs/LVISv1/{arch}_R_50_FPN_1x.yaml")
    lvis = _merged("configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml")
    assert (
        cfg.MODEL.META_ARCHITECTURE
        == {"atss": "ATSS", "retinanet": "RetinaNet", "fcos": "FCOS"}[arch]
    )
    assert cfg.MODEL[key].NUM_CLASSES == 1203
    assert cfg.MODEL[key].SCORE_THRESH_TEST == pytest.approx(1e-4)
    for name in ("TEST", "DATALOADER", "DATASETS"):
        assert cfg[name] == lvis[name], name
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
    assert cfg.INPUT.MIN_SIZE_TRAIN == lvis.INPUT.MIN_SIZE_TRAIN
    for name in ("WEIGHTS", "PIXEL_MEAN", "PIXEL_STD"):  # the export's backbone, as fine-tuned
        assert cfg.MODEL[name] == lvis.MODEL[name], name
    for name in ("DEPTH", "NORM", "STRIDE_IN_1X1", "RES2_OUT_CHANNELS"):
        assert cfg.MODEL.RESNETS[name] == lvis.MODEL.RESNETS[name], name
    assert cfg.MODEL.FPN.IN_FEATURES == ["res3", "res4", "res5"]
    assert (
        cfg.SOLVER.BASE_LR == 0.01
        and cfg.SOLVER.IMS_PER_BATCH == 16
        and cfg.SOLVER.MAX_ITER == 90000
    )


def test_atss_paper_defaults():
    """ATSS as the paper: one anchor of 8 x stride per location of P3-P7 (P6/P7 from P5), k = 9,
    focal loss (0.25, 2), GIoU weight 2, GN towers of 4 convs, NMS 0.6, top-1000 per level."""
    cfg = _merged("configs/LVISv1/atss_R_50_FPN_1x.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_fcos_resnet_fpn_backbone"
    assert cfg.MODEL.ATSS.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8 * s] for s in (8, 16, 32, 64, 128)]
    assert cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[1.0]]
    a = cfg.MODEL.ATSS
    loss = (a.TOPK, a.FOCAL_LOSS_ALPHA, a.FOCAL_LOSS_GAMMA, a.REG_LOSS_WEIGHT)
    assert loss == (9, 0.25, 2.0, 2.0)
    head = (a.NUM_CONVS, a.NORM, a.PRIOR_PROB, a.NMS_THRESH_TEST, a.TOPK_CANDIDATES_TEST)
    assert head == (4, "GN", 0.01, 0.6, 1000)
    assert tuple(a.BBOX_REG_WEIGHTS) == (10.0, 10.0, 5.0, 5.0)
    coco = _merged("configs/Base-ATSS.yaml")
    assert coco.MODEL.ATSS.SCORE_THRESH_TEST == 0.05  # COCO: the paper's


@pytest.mark.parametrize("arch", ["atss", "retinanet", "fcos"])
def test_toy_one_stage_keeps_the_toy_recipe(arch):
    """The toy one-stage configs change the detector only: the backbone that loads the toy export,
    the sampler, solver and evaluation are the toy Mask R-CNN's."""
    cfg = _merged(f"configs/toy/{arch}_finetune.yaml")
    toy = _merged("configs/toy/mask_rcnn_finetune.yaml")
    for name in ("SOLVER", "TEST", "DATALOADER", "DATASETS", "INPUT", "SEED"):
        assert cfg[name] == toy[name], name
    for name in ("DEPTH", "NORM", "RES2_OUT_CHANNELS"):
        assert cfg.MODEL.RESNETS[name] == toy.MODEL.RESNETS[name], name
    assert (
        cfg.MODEL.FPN.NORM == toy.MODEL.FPN.NORM
        and cfg.MODEL.FPN.OUT_CHANNELS == toy.MODEL.FPN.OUT_CHANNELS
    )
    assert not cfg.MODEL.MASK_ON


def test_unknown_key_fails_with_detectron2_error(tmp_path):
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.NO_SUCH_KEY"):  # yacs
        _setup("configs/toy/mask_rcnn_finetune.yaml", tmp_path, "MODEL.NO_SUCH_KEY", "1")


def test_load_config_merges_the_file_then_the_overrides():
    from drcl2.config import load_config

    path = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
    cfg = load_config(path)
    assert cfg.SOLVER.MAX_ITER == 500 and "DRCL2" in cfg.MODEL  # the file's, on drcl2's keys
    cfg = load_config(path, ["SOLVER.MAX_ITER", "7"])
    assert cfg.SOLVER.MAX_ITER == 7 and not cfg.is_frozen()


def _merged(config_file):
    from drcl2.config import load_config

    return load_config(os.path.join(REPO_ROOT, config_file))


def test_large_study():
    from drcl2.study import load_study

    study = load_study(os.path.join(REPO_ROOT, "configs/study/large.yaml"))
    assert study.device == "cuda" and study.num_gpus == 1
    assert study.datasets == {
        split: f"lvis_v1_gen_large_{split}" for split in ("train", "val", "test")
    }
    assert study.arms["2drcl"].iters == study.arms["scratch_long"].iters  # equal compute
    finetune = _merged("configs/large/mask_rcnn_R_50_FPN_finetune.yaml")
    assert finetune.TEST.DETECTIONS_PER_IMAGE == 300
    assert finetune.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-4)
    assert finetune.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert finetune.DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.01)


PRETRAIN_FINETUNE = [
    ("configs/toy/pretrain_2drcl.yaml", "configs/toy/mask_rcnn_finetune.yaml"),
    ("configs/toy/mask_rcnn_supervised_pretrain.yaml", "configs/toy/mask_rcnn_finetune.yaml"),
    (
        "configs/large/pretrain_2drcl_R_50_FPN.yaml",
        "configs/large/mask_rcnn_R_50_FPN_finetune.yaml",
    ),
    ("configs/pretrain_2drcl.yaml", "configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml"),
    ("configs/pretrain_2drcl_R_101.yaml", "configs/LVISv1/mask_rcnn_R_101_FPN_1x.yaml"),
]


@pytest.mark.parametrize("pretrain,finetune", PRETRAIN_FINETUNE)
def test_every_pretraining_export_loads_into_its_fine_tuning_detector(pretrain, finetune):
    """The export of each pre-training config (backbone, RPN, box head) has the names and shapes
    of its fine-tuning detector's: every key found, every shape equal."""
    from detectron2.modeling import build_model

    from drcl2.export import finetune_state_dict

    def build(path):
        cfg = _merged(path)
        cfg.MODEL.DEVICE = "cpu"
        return build_model(cfg)

    exported = finetune_state_dict(build(pretrain).state_dict())
    target = build(finetune).state_dict()
    parts = ("backbone.", "proposal_generator.", "roi_heads.box_head.")
    assert {p for p in parts if any(k.startswith(p) for k in exported)} == set(parts)
    assert all(k.startswith(parts) for k in exported)  # no predictor, mask head, target, MLPs
    assert sorted(k for k in exported if k not in target) == []
    assert [k for k, v in exported.items() if v.shape != target[k].shape] == []


@pytest.mark.parametrize(
    "rpn,pretrain",
    [
        ("configs/proposals/rpn_R_50_FPN_1x.yaml", "configs/pretrain_2drcl_proposals.yaml"),
        ("configs/toy/rpn_R18_FPN.yaml", "configs/toy/pretrain_2drcl_proposals.yaml"),
    ],
)
def test_proposal_configs(rpn, pretrain):
    """The proposal path's pairs: an RPN-only detector on the set that the proposal pre-training
    reads its proposals for, and a pre-training config that reads them (detectron2's keys)."""
    from drcl2.engine.checks import check_drcl2_config

    rpn_cfg, pre = _merged(rpn), _merged(pretrain)
    assert (
        rpn_cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork"
        and rpn_cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
    )
    assert rpn_cfg.DATASETS.TRAIN == pre.DATASETS.TRAIN
    assert (
        rpn_cfg.MODEL.RPN.POST_NMS_TOPK_TEST >= pre.MODEL.DRCL2.LCL.PROPOSAL_TOPK
    )  # enough written
    assert pre.MODEL.DRCL2.LCL.BOX_SOURCE == "proposals" and pre.MODEL.LOAD_PROPOSALS
    assert len(pre.DATASETS.PROPOSAL_FILES_TRAIN) == len(pre.DATASETS.TRAIN)
    check_drcl2_config(pre)
