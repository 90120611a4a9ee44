"""Pretext tasks as registered heads: a user's head named in the config trains with (or without)
the built-in ones, holds its own layers, and the target network copies exactly the modules the
enabled heads declare."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.utils.events import EventStorage
from helpers.model import NO_AR, NO_RPN, NO_SR, batch, build
from torch import nn

from drcl2.export import export_finetune_weights
from drcl2.modeling import DRCL2_HEAD_REGISTRY, PretextHead
from drcl2.modeling.losses import byol_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_OFF = [
    "MODEL.DRCL2.HCL.ENABLED",
    False,
    "MODEL.DRCL2.LCL.ENABLED",
    False,
    *NO_AR,
    *NO_SR,
    *NO_RPN,
]


@DRCL2_HEAD_REGISTRY.register()
class TinyPoolHead(PretextHead):
    """BYOL between a linear map of view 1's mean online p3 and its target copy on view 2's target
    p3."""

    @configurable
    def __init__(self, *, proj: nn.Module, weight: float = 1.0):
        super().__init__(in_features=("p3",), target_views=(2,))
        self.proj, self.weight = proj, weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {"proj": nn.Linear(input_shape["p3"].channels, 8), "weight": 2.0}

    def target_modules(self):
        return ("proj",)

    def losses(self, ctx, normalizers):
        z = self.proj(ctx.online1["p3"].mean(dim=(2, 3)))
        with torch.no_grad():
            t = ctx.target(self, "proj")(ctx.target2["p3"].mean(dim=(2, 3)))
        return {"loss_tiny": self.weight * byol_loss(z, t)}


def train_steps(model, steps):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for it in range(steps):
        optimizer.zero_grad()
        with EventStorage(it):
            losses = model(batch())
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]  # DDP (find_unused_parameters=False) needs them all
        optimizer.step()
    return losses


def test_a_registered_head_named_in_the_config_trains_with_the_builtin_ones():
    model = build(
        "MODEL.DRCL2.EXTRA_HEADS",
        ["TinyPoolHead"],
        "MODEL.DRCL2.LCL.ENABLED",
        False,
        *NO_AR,
        *NO_SR,
        *NO_RPN,
    )
    assert list(model.heads) == ["hcl", "TinyPoolHead"]
    assert isinstance(model.heads["TinyPoolHead"].proj, nn.Linear)
    assert set(model.target_network) == {"backbone", "hcl_projector", "TinyPoolHead_proj"}
    start = model.heads["TinyPoolHead"].proj.weight.detach().clone()
    losses = train_steps(model, 3)
    assert set(losses) == {"loss_hcl", "loss_tiny"} and torch.isfinite(losses["loss_tiny"])
    # the head's module trained, and its target copy follows it by EMA (neither start nor online)
    online = model.heads["TinyPoolHead"].proj.weight
    target = model.target_network["TinyPoolHead_proj"].weight
    assert not torch.equal(online, start)
    assert not torch.equal(target, start) and not torch.equal(target, online)


def test_an_extra_head_alone(tmp_path):
    model = build(
        "MODEL.DRCL2.EXTRA_HEADS",
        ["TinyPoolHead"],
        "MODEL.DRCL2.DRB.ENABLED",
        False,
        "DATALOADER.SAMPLER_TRAIN",
        "RepeatFactorTrainingSampler",
        *ALL_OFF,
    )
    # exactly what the head declares
    assert set(model.target_network) == {"backbone", "TinyPoolHead_proj"}
    losses = train_steps(model, 1)
    assert set(losses) == {"loss_tiny"}
    # the export keeps the detector's parts only: the head's module is not exported
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    exported = export_finetune_weights(str(tmp_path / "model_final.pth"), str(tmp_path / "ft.pth"))
    assert exported and all(k.startswith("backbone.") for k in exported)


def test_the_builtin_heads_and_their_targets():
    model = build()
    assert {k: h.name for k, h in model.heads.items()} == {
        "hcl": "HolisticContrastiveHead",
        "lcl": "LocalContrastiveHead",
        "ar": "AppearanceReconstructionHead",
        "sr": "SemanticReconstructionHead",
    }
    # the detector's parts are the model's, not a head's
    assert model.proposal_generator is not None and not any(
        n.startswith("heads.") and ("box_head" in n or "rpn" in n)
        for n, _ in model.named_parameters()
    )
    assert set(model.target_network) == {"backbone", "hcl_projector", "box_head", "lcl_projector"}
    # the LCL target box head follows the online roi_heads.box_head
    assert model.online_target_pairs()["box_head"] is model.roi_heads.box_head
    no_target = build("MODEL.DRCL2.HCL.ENABLED", False, "MODEL.DRCL2.LCL.ENABLED", False, *NO_SR)
    assert len(no_target.target_network) == 0  # AR and the RPN term read no target features


def test_head_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"EXTRA_HEADS.*'NoSuchHead'.*registered"):
        build("MODEL.DRCL2.EXTRA_HEADS", ["NoSuchHead"])

    with pytest.raises(ValueError, match=r"EXTRA_HEADS.*'TinyPoolHead' is listed twice"):
        build("MODEL.DRCL2.EXTRA_HEADS", ["TinyPoolHead", "TinyPoolHead"])

    @DRCL2_HEAD_REGISTRY.register()
    class SquattingHead(TinyPoolHead):
        def losses(self, ctx, normalizers):
            return {"loss_hcl": super().losses(ctx, normalizers)["loss_tiny"]}

    try:
        model = build("MODEL.DRCL2.EXTRA_HEADS", ["SquattingHead"])
        with pytest.raises(ValueError, match=r"SquattingHead returns losses \['loss_hcl'\]"):
            train_steps(model, 1)
    finally:
        DRCL2_HEAD_REGISTRY._obj_map.pop("SquattingHead")
