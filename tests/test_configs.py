"""Every config file under configs/ loads through train_net.setup() (Base-*.yaml and study files excluded)."""
import glob
import os

import pytest
from detectron2.engine import default_argument_parser

import train_net
from conftest import REPO_ROOT

CONFIGS = sorted(
    os.path.relpath(path, REPO_ROOT)
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(path).startswith("Base-")
    and not os.path.relpath(path, REPO_ROOT).startswith(os.path.join("configs", "study", ""))
)
# configs/study/*.yaml are study files, not detectron2 configs: tests/test_study.py loads each one.
STUDIES = sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "configs", "study", "*.yaml")))


def _setup(config_file, output_dir, *opts):
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO_ROOT, config_file), "OUTPUT_DIR", str(output_dir), *opts]
    )
    return train_net.setup(args)


def test_configs_are_found():
    assert "configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml" in CONFIGS
    assert "configs/toy/mask_rcnn_finetune.yaml" in CONFIGS


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_loads(config_file, tmp_path_factory):
    output_dir = tmp_path_factory.getbasetemp() / "configs"
    cfg = _setup(config_file, output_dir)
    assert cfg.VERSION == 2
    assert cfg.OUTPUT_DIR == str(output_dir)
    assert os.path.isfile(os.path.join(output_dir, "config.yaml"))  # written by default_setup
    if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
        from drcl2.modeling.meta_arch import check_drcl2_config

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


def test_unknown_key_fails_with_detectron2_error(tmp_path):
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.NO_SUCH_KEY"):  # yacs
        _setup("configs/toy/mask_rcnn_finetune.yaml", tmp_path, "MODEL.NO_SUCH_KEY", "1")
