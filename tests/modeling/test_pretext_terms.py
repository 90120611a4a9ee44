"""
The four measured defects of 2DRCL v1's design (docs/method.md, "What changed after the first
study") and the parts added to fix them: each test fails on v1's behaviour (kept behind config keys,
so the test shows that it can fail) and passes on the new default.
"""

import copy
import logging

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers.model import NO_AR, NO_RPN, NO_SR, batch, build, step_data, tiny_cfg

from drcl2.engine.checks import check_drcl2_config
from drcl2.modeling.blocks import ClassMemory

pytestmark = pytest.mark.usefixtures("one_thread")

RECONSTRUCTION = {"loss_ar", "loss_sr"}


def losses_with_mask(model, box_guided, seed=3):
    model = copy.deepcopy(model)
    model.mask_box_guided = box_guided
    torch.manual_seed(seed)  # the RPN's anchor subsampling
    with EventStorage(0):
        return {k: v.item() for k, v in model(batch()).items()}


@pytest.mark.parametrize("online_view", ["reconstruction", "all"])
def test_only_the_reconstruction_terms_see_where_the_masks_fall(online_view):
    """
    Defects 1 and 2: with every head on, moving the masked patches (all inside the drawn boxes vs
    none of them) must change only L_AR and L_SR. In 2DRCL v1 ("all") the RPN term, HCL and LCL read
    the masked view: the mask's placement is a cue to them (it tells the RPN where the objects are,
    and LCL pools boxes that were just blanked).
    """
    model = build("MODEL.DRCL2.MASK.ONLINE_VIEW", online_view, "MODEL.DRCL2.MASK.RATIO", 0.3)
    in_boxes, random = losses_with_mask(model, 1.0), losses_with_mask(model, 0.0)
    assert set(in_boxes) == set(random) and RECONSTRUCTION <= set(in_boxes)
    changed = {
        k for k in in_boxes if abs(in_boxes[k] - random[k]) > 1e-6 * max(1.0, abs(random[k]))
    }
    if online_view == "reconstruction":
        assert changed == RECONSTRUCTION
    else:
        assert {"loss_rpn_cls", "loss_hcl", "loss_lcl_inst"} <= changed


@pytest.mark.parametrize("online_view", ["reconstruction", "all"])
def test_the_supervised_detection_head_reads_the_unmasked_view1(online_view):
    """
    DET (MODEL.DRCL2.DET) trains on view 1 as fine-tuning sees images, unmasked: with masking on
    (SR), moving the masked patches (all inside the drawn boxes vs none of them) must leave its
    losses unchanged, while L_SR moves. In 2DRCL v1's "all" mode every head reads the masked view,
    so they change (the test can fail). Catches: DET reading the masked view 1
    (``ctx.online_masked``) instead of ``ctx.online1``.
    """
    model = build(
        "MODEL.DRCL2.DET.ENABLED",
        True,
        "MODEL.DRCL2.MASK.ONLINE_VIEW",
        online_view,
        "MODEL.DRCL2.MASK.RATIO",
        0.3,
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        "MODEL.DRCL2.LCL.ENABLED",
        False,
        *NO_AR,
    )
    in_boxes, random = losses_with_mask(model, 1.0), losses_with_mask(model, 0.0)
    det = {"loss_cls", "loss_box_reg"}
    assert det | {"loss_sr"} <= set(in_boxes) == set(random)
    changed = {
        k for k in in_boxes if abs(in_boxes[k] - random[k]) > 1e-6 * max(1.0, abs(random[k]))
    }
    assert "loss_sr" in changed  # the masks did move
    if online_view == "reconstruction":
        assert not changed & det, {k: (in_boxes[k], random[k]) for k in det}
    else:
        assert det <= changed


def batch_with_an_object_cut_from_view2():
    """batch() with, in image 0, a fourth object visible in view 1 only (a target, not a pair)."""
    data = batch()
    targets = data[0]["view1"]["targets"]
    extra = Instances(targets.image_size, gt_boxes=Boxes(torch.tensor([[36.0, 40.0, 60.0, 62.0]])),
                      gt_classes=torch.tensor([3]))  # fmt: skip
    data[0]["view1"]["targets"] = Instances.cat([targets, extra])
    return data


@pytest.mark.parametrize("targets", ["view", "pairs"])
def test_an_object_visible_only_in_view1_is_an_rpn_target(monkeypatch, targets):
    """
    Defect 3: the RPN's targets are view 1's own objects, so an object that the crop of view 2 cut
    away is not taught as background in view 1 (2DRCL v1, "pairs", used the pairs of both views).
    """
    from drcl2.modeling import meta_arch

    seen = []
    original = meta_arch.rpn_losses_only
    monkeypatch.setattr(
        meta_arch, "rpn_losses_only", lambda rpn, f, gt: seen.append(gt) or original(rpn, f, gt)
    )
    model = build(
        "MODEL.DRCL2.RPN.TARGETS", targets, "MODEL.DRCL2.LCL.ENABLED", False, *NO_AR, *NO_SR
    )
    step_data(model, batch_with_an_object_cut_from_view2())
    boxes = seen[0][0].gt_boxes.tensor.tolist()
    assert ([36.0, 40.0, 60.0, 62.0] in boxes) == (targets == "view")
    assert len(seen[0][1]) == 2  # image 1 unchanged


def test_l_sup_finds_positives_of_a_class_seen_once_in_the_batch(monkeypatch):
    """
    Defect 4: at small batches most classes appear once, so in 2DRCL v1 an instance's only positive
    in L_sup was its own view-2 embedding (L_sup = instance discrimination; it stayed flat). The
    class memory keeps earlier target embeddings of every class as further positives.
    """
    from drcl2.modeling import lcl_head

    def positives_per_anchor(memory):
        calls = []
        original = lcl_head.balanced_supervised_contrastive_loss
        monkeypatch.setattr(
            lcl_head,
            "balanced_supervised_contrastive_loss",
            lambda online, oc, ow, target, tc, *a: (
                calls.append((oc, tc)) or original(online, oc, ow, target, tc, *a)
            ),
        )
        model = build("MODEL.DRCL2.LCL.MEMORY_PER_CLASS", memory, *NO_AR, *NO_SR, *NO_RPN,
                      "MODEL.DRCL2.HCL.ENABLED", False)  # fmt: skip
        for iteration in range(2):
            step_data(model, batch(), iteration)
        anchor_classes, key_classes = calls[-1]
        return [int((key_classes == c).sum()) for c in anchor_classes], model

    batch_only, _ = positives_per_anchor(0)
    # batch(): classes 0 and 2 appear once in the batch, class 1 three times
    assert sorted(batch_only) == [1, 1, 3, 3, 3]
    with_memory, model = positives_per_anchor(16)
    assert sorted(with_memory) == [2, 2, 6, 6, 6]  # and as many from the first step, in the memory
    assert "heads.lcl.memory.embeddings" in model.state_dict()  # saved with checkpoints


def test_class_memory_holds_each_class_the_target_embeddings_of_its_own_instances(monkeypatch):
    """
    After a step, the rows of class c in the class memory (LCL.MEMORY_PER_CLASS) are the
    l2-normalised target embeddings of the step's drawn instances of class c, in draw order.
    Catches: the memory pushed with wrong labels (e.g. shuffled, same counts per class), which the
    counts of positives above cannot see.
    """
    from drcl2.modeling import draws

    drawn = []  # the classes of the drawn instances, image by image
    original = draws.sample_instances

    def sample_instances(classes, *args, **kwargs):
        idx = original(classes, *args, **kwargs)
        drawn.append(classes[idx])
        return idx

    monkeypatch.setattr(draws, "sample_instances", sample_instances)
    model = build("MODEL.DRCL2.LCL.MEMORY_PER_CLASS", 4, *NO_AR, *NO_SR, *NO_RPN,
                  "MODEL.DRCL2.HCL.ENABLED", False)  # fmt: skip
    targets = []
    model.target_network["lcl_projector"].register_forward_hook(
        lambda m, args, out: targets.append(out.detach())
    )
    step_data(model, batch())
    (t2,) = targets  # the target embeddings of view 2, the drawn instances in order
    t2 = torch.nn.functional.normalize(t2.float(), dim=1)
    classes = torch.cat(drawn).to(t2.device)
    assert len(classes) == len(t2) == 5  # batch(): every instance drawn (K = 8)
    memory = model.heads["lcl"].memory
    assert memory.filled.tolist() == [1, 3, 1, 0, 0]  # classes 0, 1, 1 and 2, 1
    for c in range(3):
        rows = memory.embeddings[c, : int(memory.filled[c])]
        assert torch.allclose(rows, t2[classes == c], atol=1e-6), f"class {c}"


def test_class_memory_is_first_in_first_out():
    memory = ClassMemory(num_classes=3, size=2, dim=2)
    memory.push(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), torch.tensor([0, 0, 2]))
    embeddings, classes = memory.entries()
    assert classes.tolist() == [0, 0, 2] and torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    memory.push(torch.tensor([[0.0, -1.0]]), torch.tensor([0]))  # replaces class 0's oldest
    embeddings, classes = memory.entries()
    assert classes.tolist() == [0, 0, 2]
    assert embeddings[:2].tolist() == [[0.0, -1.0], [0.0, 1.0]]
    memory.push(
        torch.tensor([[1.0, 0.0]] * 5), torch.tensor([1] * 5)
    )  # more rows than slots: the last 2
    assert memory.filled.tolist() == [2, 2, 1]


def test_supervised_detection_head_trains_the_exported_box_head():
    """
    DET on: detectron2's ROI heads (box and mask losses) train on view 1's targets with the RPN's
    proposals; LCL pools with the very same box head (one module, exported), and every parameter
    gets a gradient.
    """
    from detectron2.modeling.roi_heads import StandardROIHeads

    model = build("MODEL.DRCL2.DET.ENABLED", True, "MODEL.MASK_ON", True, *NO_AR, *NO_SR)
    assert isinstance(model.roi_heads, StandardROIHeads) and model.roi_heads.mask_on
    data = batch()
    for x in data:  # masks for view 1's targets
        t = x["view1"]["targets"]
        from detectron2.structures import BitMasks

        t.gt_masks = BitMasks.from_polygon_masks(
            [[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()] for b in t.gt_boxes.tensor], *t.image_size
        )
    losses = step_data(model, data)
    assert {
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
        "loss_rpn_cls",
        "loss_lcl_inst",
        "loss_hcl",
    } <= set(losses)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("roi_heads.box_head.") for n in names) == len(
        list(model.roi_heads.box_head.parameters())
    )


def test_supervised_detection_needs_the_rpn():
    with pytest.raises(ValueError, match="MODEL.DRCL2.DET.ENABLED"):
        check_drcl2_config(tiny_cfg("MODEL.DRCL2.DET.ENABLED", True, *NO_RPN))
    with pytest.raises(ValueError, match="detection losses need the RPN"):
        build("MODEL.DRCL2.DET.ENABLED", True, *NO_RPN)  # a model built from Python likewise


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_lcl_backbone_gradient_scale(scale):
    """LCL.BACKBONE_GRAD 0: LCL trains its box head and MLPs but sends nothing into the backbone."""
    model = build(
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        *NO_AR,
        *NO_SR,
        *NO_RPN,
        "MODEL.DRCL2.LCL.BACKBONE_GRAD",
        scale,
    )
    losses = step_data(model, batch())
    sum(losses.values()).backward()
    backbone = [p.grad for n, p in model.named_parameters() if n.startswith("backbone.")]
    assert all(g is not None for g in backbone)  # DDP: a (zero) gradient for every parameter
    assert (sum(g.abs().sum() for g in backbone) > 0) == (scale > 0)
    assert model.roi_heads.box_head.fc1.weight.grad.abs().sum() > 0


def test_lcl_infonce_instance_term():
    """LCL.LOSS infonce: the instance term has negatives, so identical views do not zero it out."""
    model = build(
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        *NO_AR,
        *NO_SR,
        *NO_RPN,
        "MODEL.DRCL2.LCL.LOSS",
        "infonce",
        "MODEL.DRCL2.LCL.SUPERVISED",
        False,
    )
    losses = step_data(model, batch())
    assert set(losses) == {"loss_lcl_inst"} and losses["loss_lcl_inst"].item() > 0.1
    with pytest.raises(ValueError, match="MODEL.DRCL2.LCL.LOSS"):
        build("MODEL.DRCL2.LCL.LOSS", "mse")


def test_a_skipped_lcl_step_is_logged(drcl2_log):
    """LCL's batch norm cannot train on one instance: the step's LCL loss is 0, and it says so."""
    model = build(
        "MODEL.DRCL2.HEAD_NORM", "BN", "MODEL.DRCL2.HCL.ENABLED", False, *NO_AR, *NO_SR, *NO_RPN
    )
    data = batch()[:1]
    for v in ("view1", "view2"):
        data[0][v]["instances"] = data[0][v]["instances"][:1]
    with EventStorage(0) as storage:
        losses = model(data)
    assert losses["loss_lcl_inst"].item() == 0.0
    assert storage.latest()["drcl2/lcl_skipped"][0] == 1.0
    assert any(
        "LCL skipped" in r.getMessage() and r.levelno == logging.WARNING for r in drcl2_log.records
    )
