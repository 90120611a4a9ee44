"""Export of DRCL2 pre-training weights and their loading into the LVIS fine-tuning detector."""

import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import cfg_from

from drcl2.export import FINETUNE_PREFIXES, export_finetune_weights
from drcl2.modeling import DRCL2
from drcl2.tools import export_weights


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A DRCL2 R-50 checkpoint (fresh weights; the online ones nudged so they differ from init)."""
    out = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    model = build_model(cfg_from("configs/pretrain_2drcl.yaml"))
    assert isinstance(model, DRCL2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(FINETUNE_PREFIXES):
                p.add_(0.01)
    DetectionCheckpointer(model, str(out)).save("model_final", iteration=41)
    return model, out / "model_final.pth"


def test_export_loads_into_lvis_mask_rcnn_with_every_key(pretrained, tmp_path, caplog):
    model, src = pretrained
    dst = tmp_path / "finetune.pth"
    exported = export_finetune_weights(str(src), str(dst))
    online = model.state_dict()
    expected = {k for k in online if k.startswith(FINETUNE_PREFIXES)}
    assert set(exported) == expected
    assert not any(
        k.startswith(("target_network.", "hcl_", "lcl_", "ar_", "sr_")) for k in exported
    )

    detector = build_model(cfg_from("configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml"))
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(detector).load(str(dst), checkpointables=[])
    assert "shape" not in caplog.text.lower() and "unexpected" not in caplog.text.lower()
    state = detector.state_dict()
    assert expected <= set(state), sorted(expected - set(state))[:5]
    for k in expected:
        assert torch.equal(state[k], online[k]), k
    fresh = {k for k in state if k not in expected}
    assert all(k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_head.")) for k in fresh), (
        fresh
    )


def test_detector_checkpoint_exports_the_same_parts(tmp_path):
    """The supervised pre-training baseline: a Mask R-CNN checkpoint exports exactly the parts a
    2DRCL export holds (no box predictor, no mask head)."""
    detector = build_model(cfg_from("configs/toy/mask_rcnn_finetune.yaml"))
    DetectionCheckpointer(detector, str(tmp_path)).save("detector")
    state = export_finetune_weights(str(tmp_path / "detector.pth"), str(tmp_path / "x.pth"))
    full = detector.state_dict()
    assert set(state) == {
        k for k in full if k.startswith(("backbone.", "proposal_generator.", "roi_heads.box_head."))
    }
    assert all(torch.equal(state[k], full[k]) for k in state)
    assert torch.load(tmp_path / "x.pth", weights_only=False)["model"].keys() == state.keys()


def test_export_refuses_other_files(pretrained, tmp_path):
    torch.save({"model": {"head.weight": torch.zeros(2)}}, tmp_path / "no_backbone.pth")
    with pytest.raises(ValueError, match="not a pre-training checkpoint.*no 'backbone"):
        export_finetune_weights(str(tmp_path / "no_backbone.pth"), str(tmp_path / "x.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a pre-training checkpoint"):
        export_finetune_weights(str(junk), str(tmp_path / "y.pth"))
    assert export_weights.main([str(junk), str(tmp_path / "z.pth")]) == 1
    assert not (tmp_path / "z.pth").exists()
    _, src = pretrained
    assert export_weights.main([str(src), str(tmp_path / "ok.pth")]) == 0
    assert (tmp_path / "ok.pth").exists()


def test_imagenet_style_weights_load_into_the_online_network(tmp_path):
    """A model-zoo style .pkl (name-matching heuristics) loads into DRCL2 with no ambiguity."""
    import pickle

    from drcl2.checkpoint import DRCL2Checkpointer

    torch.manual_seed(0)
    cfg = cfg_from("configs/toy/pretrain_2drcl.yaml")
    model = build_model(cfg)
    bottom_up = {
        k[len("backbone.bottom_up.") :]: v.numpy() + 1.0
        for k, v in model.state_dict().items()
        if k.startswith("backbone.bottom_up.")
    }
    path = tmp_path / "imagenet.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": bottom_up, "__author__": "test", "matching_heuristics": True}, f)
    with pytest.raises(
        ValueError, match="multiple keys"
    ):  # what detectron2's own checkpointer does
        DetectionCheckpointer(model).load(str(path), checkpointables=[])
    DRCL2Checkpointer(model).load(str(path), checkpointables=[])
    state = model.state_dict()
    for k, v in bottom_up.items():
        assert torch.equal(state["backbone.bottom_up." + k], torch.as_tensor(v)), k
    assert not bool(model.target_initialized)  # the first training step copies online -> target
