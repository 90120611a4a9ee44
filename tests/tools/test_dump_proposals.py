"""The whole proposal path on the toy set: train a toy class-agnostic RPN -> dump its proposals
(python -m drcl2.tools.dump_proposals) -> 2DRCL pre-training with LCL.BOX_SOURCE "proposals" ->
export -> the export loads into the toy fine-tuning Mask R-CNN."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from helpers import REPO_ROOT, cfg_from

from drcl2.engine import Trainer
from drcl2.tools import dump_proposals

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "SOLVER.IMS_PER_BATCH", 2,
    "DATALOADER.NUM_WORKERS", 0,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96,
    "SOLVER.CHECKPOINT_PERIOD", 100,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_train_mini(toy_lvis_root, tmp_path_factory):
    """The first 12 images of lvis_v1_toy_train as their own LVIS-format dataset; its name."""
    from drcl2.data import register_lvis_format

    meta = MetadataCatalog.get("lvis_v1_toy_train")
    with open(meta.json_file) as f:
        data = json.load(f)
    data["images"] = data["images"][:12]
    ids = {img["id"] for img in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path_factory.mktemp("toy_train_mini") / "lvis_v1_toy_train_mini.json"
    path.write_text(json.dumps(data))
    register_lvis_format("lvis_v1_toy_train_mini", str(path), meta.image_root)
    return "lvis_v1_toy_train_mini", ids


@pytest.mark.slow
def test_rpn_dump_pretrain_export_finetune(tmp_path, toy_train_mini):
    name, ids = toy_train_mini
    # 1. a toy class-agnostic RPN, a few iterations
    rpn_cfg = cfg_from(
        "configs/toy/rpn_R18_FPN.yaml",
        "DATASETS.TRAIN",
        (name,),
        "SOLVER.MAX_ITER",
        3,
        "OUTPUT_DIR",
        str(tmp_path / "rpn"),
        *SMALL,
    )
    rpn = Trainer(rpn_cfg)
    rpn.resume_or_load(resume=False)
    rpn.train()
    weights = tmp_path / "rpn" / "model_final.pth"
    assert weights.exists()

    # 2. its proposals on the training set, in detectron2's proposal-file format
    proposals = tmp_path / "proposals" / "train.pkl"
    argv = [
        "--config-file", os.path.join(REPO_ROOT, "configs/toy/rpn_R18_FPN.yaml"),
        "MODEL.WEIGHTS", str(weights),
        "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", 0,
        "INPUT.MIN_SIZE_TEST", 64,
        "--dataset", name,
        "--output", str(proposals),
    ]  # fmt: skip
    assert dump_proposals.main([str(a) for a in argv]) == 0
    with open(proposals, "rb") as f:
        dumped = pickle.load(f)
    assert set(dumped["ids"]) == ids and dumped["bbox_mode"] == 0  # BoxMode.XYXY_ABS
    for image_id, boxes, logits in zip(dumped["ids"], dumped["boxes"], dumped["objectness_logits"]):
        assert boxes.shape[1] == 4 and 0 < len(boxes) <= 50 and logits.shape == (len(boxes),)
        assert np.all(np.diff(logits) <= 0)  # by decreasing objectness
        assert boxes[:, 2:].max() <= 128.5  # in the original image (<= 128 px), not the test size

    # 3. 2DRCL pre-training with LCL's boxes from those proposals
    pre_cfg = cfg_from(
        "configs/toy/pretrain_2drcl_proposals.yaml",
        "DATASETS.TRAIN",
        (name,),
        "DATASETS.PROPOSAL_FILES_TRAIN",
        (str(proposals),),
        "SOLVER.MAX_ITER",
        2,
        "OUTPUT_DIR",
        str(tmp_path / "pretrain"),
        *SMALL,
    )
    mapped = Trainer.build_train_mapper(pre_cfg)(Trainer.build_train_dataset(pre_cfg)[0])
    assert len(mapped["view1"]["proposals"]) > 0  # the mapper carries the dumped proposals
    pretrain = Trainer(pre_cfg)
    assert pretrain.model.box_source == "proposals"
    pretrain.resume_or_load(resume=False)
    pretrain.train()
    losses = pretrain.storage.latest()
    assert np.isfinite(losses["loss_lcl_inst"][0]) and np.isfinite(losses["loss_lcl_sup"][0])

    # 4. the export loads into the toy fine-tuning detector: every exported key, same values
    export = tmp_path / "pretrain" / "model_final_finetune.pth"
    detector = build_model(
        cfg_from("configs/toy/mask_rcnn_finetune.yaml", "MODEL.ROI_BOX_HEAD.FC_DIM", 128)
    )
    DetectionCheckpointer(detector).load(str(export), checkpointables=[])
    exported = torch.load(export, weights_only=False)["model"]
    state = detector.state_dict()
    assert exported and all(torch.equal(state[k], v) for k, v in exported.items())
    assert {k.split(".")[0] for k in exported} == {"backbone", "proposal_generator", "roi_heads"}
