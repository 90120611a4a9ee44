"""The DRCL2 meta-architecture on a tiny R-18 model and synthetic two-view batches (CPU)."""

import copy
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import REPO_ROOT
from helpers.model import (
    LOSS_KEYS,
    NO_AR,
    NO_RPN,
    NO_SR,
    batch,
    build,
    hand_over_drb,
    step,
    step_data,
    tiny_cfg,
    view,
)

from drcl2.config import add_drcl2_config
from drcl2.engine.checks import check_drcl2_config
from drcl2.modeling import DRCL2
from drcl2.modeling.draws import model_draws
from drcl2.modeling.ema import cosine_momentum

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_step_losses_and_gradients():
    model = build()
    assert isinstance(model, DRCL2)
    losses, storage = step(model)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert "drcl2/momentum" in storage.latest()  # (lambda is the Trainer's drb/lambda)
    sum(losses.values()).backward()

    groups = {
        "backbone.bottom_up.": "ResNet",
        "backbone.fpn_": "FPN",
        "proposal_generator.": "RPN",
        "roi_heads.box_head.": "box head",
        "heads.hcl.projector.": "HCL projector",
        "heads.hcl.predictor.": "HCL predictor",
        "heads.lcl.projector.": "LCL projector",
        "heads.lcl.predictor.": "LCL predictor",
        "heads.ar.decoder.": "AR decoder",
        "heads.sr.predictors.": "SR predictors",
    }
    params = dict(model.named_parameters())
    for prefix, what in groups.items():
        group = {n: p for n, p in params.items() if n.startswith(prefix)}
        assert group, f"no parameters for {what}"
        missing = [n for n, p in group.items() if p.requires_grad and p.grad is None]
        assert not missing, f"{what}: no gradient for {missing}"
        assert any(p.grad.abs().sum() > 0 for p in group.values() if p.grad is not None), what
    target = {n: p for n, p in params.items() if n.startswith("target_network.")}
    assert target and all(not p.requires_grad and p.grad is None for p in target.values())
    assert set(model.target_network) == {"backbone", "hcl_projector", "box_head", "lcl_projector"}


# ---------------------------------------------------------------------------------------------
# The model owns its target update
TARGET = "target_network.backbone.fpn_output3.weight"


def sgd_step(model, lr=0.1):
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    model.zero_grad(set_to_none=True)


def train_step(model, iteration=None):
    """Forward (under an EventStorage of ``iteration``, or none), backward, SGD step."""
    torch.manual_seed(100 + (iteration or 0))  # the RPN's anchor subsampling draws from torch's RNG
    if iteration is None:
        losses = model(batch())
    else:
        losses, _ = step(model, iteration)
    sum(losses.values()).backward()
    sgd_step(model)


def test_target_moves_once_per_new_iteration_with_that_iterations_momentum():
    """Catches: no EMA without drcl2's hook, an EMA at every forward, the momentum of the wrong
    iteration."""
    model = build(*NO_AR, *NO_SR, *NO_RPN)
    params = dict(model.named_parameters())
    online = params[TARGET.replace("target_network.", "")]
    train_step(model, 3)  # first forward: the target is a copy of the online network
    start = params[TARGET].detach().clone()
    online_after_3 = online.detach().clone()
    assert not torch.equal(start, online_after_3)
    losses, storage = step(model, 3)  # same iteration again (e.g. gradient accumulation): no EMA
    assert torch.equal(params[TARGET], start)
    _, storage = step(model, 4)  # new iteration: the EMA step of iteration 3
    m3 = cosine_momentum(0.99, 3, 10)
    assert torch.allclose(params[TARGET], m3 * start + (1 - m3) * online_after_3, atol=1e-7)
    assert storage.latest()["drcl2/momentum"][0] == pytest.approx(cosine_momentum(0.99, 4, 10))
    assert model.update_target() == pytest.approx(cosine_momentum(0.99, 4, 10))  # the pending step
    assert model.update_target() is None  # ... applied once


def test_without_a_trainer_each_training_forward_is_a_new_iteration():
    """Catches: a target that only moves under an EventStorage (detectron2's RPN losses need
    one)."""
    model = build(*NO_AR, *NO_SR, *NO_RPN)
    target = dict(model.named_parameters())[TARGET]
    seen = []
    for _ in range(3):
        seen.append(target.detach().clone())
        train_step(model)
    assert int(model.last_iteration) == 2
    assert not torch.equal(seen[1], seen[2])  # the EMA step of iteration 0, at the forward of 1


def test_checkpoint_resume_gives_the_uninterrupted_target():
    """
    The checkpoint of iteration k holds the target after step k - 1 and the pending step k
    (buffers ``last_iteration``, ``target_update_pending``); the first forward after loading it
    applies step k. Catches: non-persistent state (the resumed run skips or repeats a step).
    """
    opts = [*NO_SR, *NO_RPN, "MODEL.DRCL2.LCL.NUM_INSTANCES", 2]  # K < instances: seeded draws
    uninterrupted = build(*opts)
    for it in range(2):
        train_step(uninterrupted, it)
    checkpoint = copy.deepcopy(uninterrupted.state_dict())  # written after iteration 1
    assert int(checkpoint["last_iteration"]) == 1 and bool(checkpoint["target_update_pending"])
    train_step(uninterrupted, 2)
    uninterrupted.update_target()

    resumed = build(*opts)
    resumed.load_state_dict(checkpoint)
    train_step(resumed, 2)
    resumed.update_target()
    for k, v in uninterrupted.state_dict().items():
        if k.startswith("target_network."):
            assert torch.allclose(resumed.state_dict()[k], v, atol=1e-6), k


def test_drb_without_class_statistics_refuses_to_train():
    """Catches: a warning (or silent uniform weights) instead of an error under a foreign
    trainer."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    assert model.drb and model.rebalance_schedule is None
    with pytest.raises(RuntimeError, match=r"model\.set_class_statistics\(dataset_dicts\)"):
        step(model)


@pytest.mark.parametrize(
    "part,keys,prefixes",
    [
        (
            "HCL",
            {"loss_hcl"},
            ["heads.hcl.", "target_network.hcl_projector."],
        ),
        (
            "LCL",
            {"loss_lcl_inst", "loss_lcl_sup"},
            ["roi_heads.", "heads.lcl.", "target_network.box_head."],
        ),
        ("AR", {"loss_ar"}, ["heads.ar."]),
        ("SR", {"loss_sr"}, ["heads.sr."]),
        ("RPN", {"loss_rpn_cls", "loss_rpn_loc"}, ["proposal_generator."]),
    ],
)
def test_switching_a_part_off_removes_its_loss_and_parameters(part, keys, prefixes):
    model = build(f"MODEL.DRCL2.{part}.ENABLED", False)
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        assert not any(n.startswith(prefix) for n in names), prefix
    losses, _ = step(model)
    assert set(losses) == LOSS_KEYS - keys
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # what DDP without find_unused_parameters needs


def test_decor_adds_its_loss_and_reads_view1_inside_the_images():
    from drcl2.modeling.decorrelation_head import FeatureDecorrelationHead

    model = build("MODEL.DRCL2.DECOR.ENABLED", True, *NO_AR, *NO_SR)
    head = next(h for h in model.heads.values() if isinstance(h, FeatureDecorrelationHead))
    assert head.in_features == ["p2", "p3", "p4", "p5"]
    losses, _ = step(model)
    assert set(losses) == LOSS_KEYS - {"loss_ar", "loss_sr"} | {"loss_decor"}
    assert 0.0 < losses["loss_decor"].item() < 1.0
    losses["loss_decor"].backward()
    fpn = [p for n, p in model.named_parameters() if n.startswith("backbone.fpn_output")]
    assert fpn and all(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn)

    # locations: only cells holding a pixel of the image; padding never enters the loss
    valid = torch.zeros((2, 64, 64), dtype=torch.bool)
    valid[0] = True
    valid[1, :40, :24] = True  # image 2 is 40 x 24 inside the padded 64 x 64
    features = torch.randn((2, 4, 16, 16))  # stride 4
    rows = head.locations(features, valid, 4)
    assert rows.shape == (16 * 16 + 10 * 6, 4)
    padded = features.clone()
    padded[1, :, 10:, :] = 1e3
    padded[1, :, :, 6:] = -1e3
    assert torch.equal(head.locations(padded, valid, 4), rows)


# ---------------------------------------------------------------------------------------------
# Tests that fail on a broken model
def record_outputs(module, calls):
    return module.register_forward_hook(lambda m, args, out: calls.append(out.detach()))


@pytest.mark.parametrize("online_view", ["reconstruction", "all"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_online_sees_masked_x1_and_target_sees_unmasked_x1_and_x2(symmetric, online_view):
    """
    The online network sees x1 unmasked (HCL) and masked (SR) in one batch, or, in 2DRCL v1's
    "all" mode, only the masked x1; the target sees x1 and x2 unmasked. Catches: the online network
    without the masked view, the target on the masked one, views swapped.
    """
    # SR on: the target reads x1 (SR's targets) and x2 (HCL's); masking is on with SR.
    model = build(
        "MODEL.DRCL2.SYMMETRIC",
        symmetric,
        "MODEL.DRCL2.LCL.ENABLED",
        False,
        *NO_AR,
        *NO_RPN,
        "MODEL.DRCL2.MASK.ONLINE_VIEW",
        online_view,
    )
    inputs = {}
    model.backbone.register_forward_pre_hook(lambda m, args: inputs.setdefault("online", args[0]))
    model.target_network["backbone"].register_forward_pre_hook(
        lambda m, args: inputs.setdefault("target", args[0])
    )
    step(model, 5)
    images, instances1, _ = model.preprocess(batch())
    x1, x2 = images.tensor[:2], images.tensor[2:]
    _, mask = model_draws(model, batch(), 5)
    mask = torch.stack(
        [torch.nn.functional.pad(m, (0, 64 - m.shape[1], 0, 64 - m.shape[0])) for m in mask]
    )
    for i, (h, w) in enumerate(images.image_sizes[:2]):  # MASK.RATIO 0.5 of the 16 px patches
        assert 0.3 < mask[i, :h, :w].float().mean() < 0.7
    mask = mask.to(x1.device)
    masked_x1 = x1 * ~mask[:, None]
    assert not torch.equal(masked_x1, x1)
    online = [x1, masked_x1] if online_view == "reconstruction" else [masked_x1]
    assert torch.equal(inputs["online"], torch.cat(online + ([x2] if symmetric else [])))
    assert torch.equal(inputs["target"], torch.cat([x1, x2]))


def test_permuting_view2_boxes_changes_l_inst():
    """
    Two identical views, the target equal to the online network (first step), an identity LCL
    predictor and no masking: the aligned pairs give L_inst = 0. Permuting view 2's boxes must
    raise it. Catches: view-2 boxes drawn independently of view 1, the target pooling view-1 boxes.
    """
    model = build(
        *NO_AR,
        *NO_SR,
        *NO_RPN,
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        "MODEL.DRCL2.LCL.NUM_INSTANCES",
        2,
    )  # K < instances: the draw matters
    model.heads["lcl"].predictor = torch.nn.Identity()
    data = batch()
    for x in data:
        x["view2"] = {"image": x["view1"]["image"].clone(), "instances": x["view1"]["instances"]}
    with EventStorage(0):
        aligned = model(data)["loss_lcl_inst"].item()
    assert aligned == pytest.approx(0.0, abs=1e-5)
    for x in data:
        inst = x["view1"]["instances"]
        permuted = Instances(
            inst.image_size,
            gt_classes=inst.gt_classes,
            gt_ids=inst.gt_ids,
            gt_boxes=Boxes(inst.gt_boxes.tensor.roll(1, dims=0)),
        )
        x["view2"] = {"image": x["view1"]["image"], "instances": permuted}
    with EventStorage(0):
        assert model(data)["loss_lcl_inst"].item() > 0.01


def test_late_iteration_weights_are_r_ins_to_the_lambda(monkeypatch):
    """
    At iteration 8 of 10 (lambda = 0.8), the weights of instance selection, box-guided masking and
    L_sup are (r_c^ins)^0.8. Catches: lambda stuck at 0, the statistics not used, a stale lambda.
    """
    from drcl2.modeling import draws, lcl_head

    calls = {}

    def spy(module, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.setdefault(fn.__name__, []).append((args, out))
            return out

        monkeypatch.setattr(module, fn.__name__, wrapped)

    for module, fn in (
        (draws, draws.sample_instances),
        (draws, draws.box_guided_patch_mask),
        (lcl_head, lcl_head.balanced_supervised_contrastive_loss),
    ):
        spy(module, fn)
    model = build(*NO_SR, *NO_RPN, "MODEL.DRCL2.LCL.NUM_INSTANCES", 2)
    step(model, 8)
    assert model.term_weights_at(8)[0] == pytest.approx(0.8)
    w = model.class_repeat_factors**0.8
    assert w.max() > 2.5  # the rare class is up-weighted
    sampled = []  # classes of the drawn instances, per image
    # The draws run on the host (the model hands them CPU copies): compared on the model's device.
    for (classes, class_weights, _, _), idx in calls["sample_instances"]:  # one call per image
        assert torch.allclose(class_weights.to(w.device), w)
        sampled.append(classes[idx])
    assert len(sampled) == len(calls["box_guided_patch_mask"]) == 2
    for ((_, _, _, _, box_weights, _), _), classes in zip(calls["box_guided_patch_mask"], sampled):
        assert torch.allclose(box_weights.to(w.device), w[classes])
    (((_, _, sup_weights, *_), _),) = calls["balanced_supervised_contrastive_loss"]
    assert torch.allclose(sup_weights, w[torch.cat(sampled)])

    # DRB.APPLY_TO ["sup"]: instance selection and masking weigh every class 1, L_sup keeps w
    calls.clear()
    model = build(
        *NO_SR, *NO_RPN, "MODEL.DRCL2.LCL.NUM_INSTANCES", 2, "MODEL.DRCL2.DRB.APPLY_TO", ["sup"]
    )
    step(model, 8)
    for (_, class_weights, _, _), _ in calls["sample_instances"]:
        assert torch.equal(class_weights.to(w.device), torch.ones_like(w))
    for (_, _, _, _, box_weights, _), _ in calls["box_guided_patch_mask"]:
        assert torch.equal(box_weights, torch.ones_like(box_weights))
    (((_, classes, sup_weights, *_), _),) = calls["balanced_supervised_contrastive_loss"]
    assert torch.allclose(sup_weights, w[classes])
    with pytest.raises(ValueError, match="MODEL.DRCL2.DRB.APPLY_TO"):
        check_drcl2_config(tiny_cfg("MODEL.DRCL2.DRB.APPLY_TO", ["images"]))


def _byol(z, t):
    return (2 - 2 * torch.nn.functional.cosine_similarity(z, t, dim=1)).mean()


def _info_nce(z, t, tau=0.2):
    logits = (
        torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(t, dim=1).t() / tau
    )
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(z), device=z.device))


@pytest.mark.parametrize(
    "loss,symmetric", [("byol", False), ("byol", True), ("infonce", False), ("infonce", True)]
)
def test_symmetric_and_infonce_follow_their_formulas(loss, symmetric):
    """
    L_HCL and L_inst recomputed from the embeddings the model produced: BYOL 2 - 2cos or InfoNCE
    over the batch (tau 0.2); SYMMETRIC averages the (online x1, target x2) and (online x2,
    target x1) pairs. Catches: an option that is ignored or wired to the wrong views.
    """
    model = build(
        "MODEL.DRCL2.HCL.LOSS", loss, "MODEL.DRCL2.SYMMETRIC", symmetric, *NO_AR, *NO_SR, *NO_RPN
    )
    z, t, e, u = [], [], [], []
    record_outputs(model.heads["hcl"].predictor, z)
    record_outputs(model.target_network["hcl_projector"], t)
    record_outputs(model.heads["lcl"].predictor, e)
    record_outputs(model.target_network["lcl_projector"], u)
    losses, _ = step(model)
    pair = _byol if loss == "byol" else _info_nce
    if symmetric:
        assert len(z) == 2 and len(t) == 1 and len(e) == 2 and len(u) == 1
        t1, t2 = t[0].chunk(2)
        u1, u2 = u[0].chunk(2)
        hcl = 0.5 * (pair(z[0], t2) + pair(z[1], t1))
        inst = 0.5 * (_byol(e[0], u2) + _byol(e[1], u1))
    else:
        assert len(z) == len(t) == len(e) == len(u) == 1
        hcl, inst = pair(z[0], t[0]), _byol(e[0], u[0])
    assert losses["loss_hcl"].item() == pytest.approx(hcl.item(), rel=1e-5)
    assert losses["loss_lcl_inst"].item() == pytest.approx(inst.item(), rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_queues_hold_the_earlier_steps_keys_as_negatives(symmetric):
    """
    HCL.QUEUE_SIZE / LCL.QUEUE_SIZE (MoCo): each InfoNCE term contrasts against the global batch's
    keys and then the queue's, which holds the l2-normalised view-2 keys of earlier steps, first in,
    first out. Recomputed from the embeddings the model produced over three steps. Catches: a queue
    never read or never filled, the step's own keys queued before the loss (its positives again as
    negatives), the positives' indices shifted by the queue, view 1's keys queued.
    """
    queue_size = {"hcl": 3, "lcl": 7}  # batch(): 2 images, 5 drawn instances a step
    model = build(
        "MODEL.DRCL2.SYMMETRIC", symmetric, *NO_AR, *NO_SR, *NO_RPN,
        "MODEL.DRCL2.HCL.LOSS", "infonce", "MODEL.DRCL2.HCL.QUEUE_SIZE", queue_size["hcl"],
        "MODEL.DRCL2.LCL.LOSS", "infonce", "MODEL.DRCL2.LCL.QUEUE_SIZE", queue_size["lcl"],
        "MODEL.DRCL2.LCL.SUPERVISED", False,
    )  # fmt: skip
    heads = {"hcl": model.heads["hcl"], "lcl": model.heads["lcl"]}
    tau = {"hcl": 0.2, "lcl": 0.5}
    loss_keys = {"hcl": "loss_hcl", "lcl": "loss_lcl_inst"}
    queued = {"hcl": [], "lcl": []}  # every view-2 key pushed so far, oldest first
    for iteration in range(3):
        online = {"hcl": [], "lcl": []}
        target = {"hcl": [], "lcl": []}
        hooks = [record_outputs(heads[h].predictor, online[h]) for h in heads] + [
            record_outputs(model.target_network[f"{h}_projector"], target[h]) for h in heads
        ]
        losses, _ = step(model, iteration)
        for hook in hooks:
            hook.remove()
        for h in heads:
            t1, t2 = target[h][0].chunk(2) if symmetric else (None, target[h][0])
            negatives = queued[h][-queue_size[h] :]
            expected = _info_nce_with(online[h][0], t2, negatives, tau[h])
            if symmetric:
                expected = 0.5 * (expected + _info_nce_with(online[h][1], t1, negatives, tau[h]))
            assert losses[loss_keys[h]].item() == pytest.approx(expected.item(), rel=1e-5), (
                h,
                iteration,
            )
            queued[h] += list(torch.nn.functional.normalize(t2.float(), dim=1))
            held = heads[h].queue.entries()
            assert len(held) == min(len(queued[h]), queue_size[h])
            expected_held = torch.stack(queued[h][-queue_size[h] :])
            assert torch.allclose(
                held[held[:, 0].argsort()], expected_held[expected_held[:, 0].argsort()], atol=1e-6
            )  # the same keys (the queue's slots are in no particular order)
    assert "heads.hcl.queue.embeddings" in model.state_dict()  # resumed with the checkpoint


def test_a_queue_without_infonce_or_of_a_bad_size_is_refused():
    with pytest.raises(ValueError, match="MODEL.DRCL2.HCL.QUEUE_SIZE > 0.*MODEL.DRCL2.HCL.LOSS"):
        build("MODEL.DRCL2.HCL.QUEUE_SIZE", 8)  # HCL.LOSS byol
    with pytest.raises(ValueError, match="MODEL.DRCL2.LCL.QUEUE_SIZE > 0.*MODEL.DRCL2.LCL.LOSS"):
        build("MODEL.DRCL2.LCL.QUEUE_SIZE", 8)
    with pytest.raises(ValueError, match="MODEL.DRCL2.LCL.QUEUE_SIZE = -1"):
        build("MODEL.DRCL2.LCL.LOSS", "infonce", "MODEL.DRCL2.LCL.QUEUE_SIZE", -1)


def _info_nce_with(z, t, negatives, tau):
    """InfoNCE of queries z against their own keys t, then ``negatives`` (normalised rows)."""
    keys = torch.nn.functional.normalize(t.float(), dim=1)
    if negatives:
        keys = torch.cat([keys, torch.stack(negatives).to(keys)])
    logits = torch.nn.functional.normalize(z.float(), dim=1) @ keys.t() / tau
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(z), device=z.device))


def test_images_without_instances_still_train_hcl_and_drc():
    model = build()
    data = batch()
    for x in data:
        for v in ("view1", "view2"):
            x[v]["instances"] = x[v]["instances"][:0]
    with EventStorage(0):
        losses = model(data)
    assert set(losses) == LOSS_KEYS
    assert losses["loss_lcl_inst"].item() == 0.0 and losses["loss_hcl"].item() > 0
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_class_statistics_are_buffers_and_drive_instance_weights():
    model = build("SOLVER.MAX_ITER", 10)
    dicts = [{"annotations": [{"category_id": 0}] * 5}] * 9 + [
        {"annotations": [{"category_id": 4}]}
    ]
    model.set_class_statistics(dicts)
    sd = model.state_dict()
    assert bool(sd["class_statistics_set"]) and sd["class_repeat_factors"].shape == (5,)
    r = sd["class_repeat_factors"]
    assert r[4] > r[0] >= 1.0  # the rare class is up-weighted
    assert torch.allclose(model.class_weights_at(0.0), torch.ones(5, device=model.device))
    assert torch.allclose(model.class_weights_at(0.5), r**0.5)
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES"):
        model.set_class_statistics([{"annotations": [{"category_id": 7}]}])


@pytest.mark.parametrize(
    "opt,value,key",
    [
        ("MODEL.DRCL2.MASK.RATIO", 1.0, "MODEL.DRCL2.MASK.RATIO"),
        ("MODEL.DRCL2.MASK.RATIO", -0.1, "MODEL.DRCL2.MASK.RATIO"),
        ("MODEL.DRCL2.LCL.NUM_INSTANCES", 0, "MODEL.DRCL2.LCL.NUM_INSTANCES"),
        ("MODEL.DRCL2.SR.WEIGHT", -1.0, "MODEL.DRCL2.SR.WEIGHT"),
        ("MODEL.DRCL2.LCL.SUP_WEIGHT", -0.5, "MODEL.DRCL2.LCL.SUP_WEIGHT"),
        ("MODEL.DRCL2.HCL.LOSS", "nce", "MODEL.DRCL2.HCL.LOSS"),
        ("MODEL.DRCL2.BASE_MOMENTUM", 1.5, "MODEL.DRCL2.BASE_MOMENTUM"),
        ("MODEL.DRCL2.MASK.BOX_GUIDED", 2.0, "MODEL.DRCL2.MASK.BOX_GUIDED"),
        ("MODEL.DRCL2.SR.IN_FEATURES", ["p9"], "MODEL.DRCL2.SR.IN_FEATURES"),
        ("MODEL.DRCL2.HEAD_NORM", "BatchNorm", "MODEL.DRCL2.HEAD_NORM"),
        ("MODEL.DRCL2.HCL.TEMPERATURE", 0.0, "MODEL.DRCL2.HCL.TEMPERATURE"),
        # item 6: evaluation would crash after training (skipping the export)
        ("DATASETS.TEST", ("lvis_v1_toy_val",), "DATASETS.TEST"),
        # item 6: p6 (stride 64) cannot be upsampled onto an image padded to a multiple of 32
        ("MODEL.DRCL2.AR.IN_FEATURE", "p6", "MODEL.DRCL2.AR.IN_FEATURE"),
        # item 6: one image per process: the HCL MLPs' batch norm would see a single value
        ("SOLVER.IMS_PER_BATCH", 1, "SOLVER.IMS_PER_BATCH"),
    ],
)
def test_invalid_config_is_refused_before_training_naming_the_key(opt, value, key):
    """By the start-up checks (the model's and shared keys, and how they agree with the data path)
    or when the model is built (each head checks its own keys)."""
    cfg = tiny_cfg(opt, value)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_drcl2_config(cfg)
        build_model(cfg)


def test_one_image_batches_train_with_a_norm_without_batch_statistics():
    """IMS_PER_BATCH 1 is refused with batch-norm heads (above), trains with LN heads; a 1-image
    batch handed to a BN model from Python is refused with the same advice."""
    hcl_only = ["MODEL.DRCL2.LCL.ENABLED", False, *NO_AR, *NO_SR, *NO_RPN]
    with pytest.raises(ValueError, match="HEAD_NORM"):
        step_data(build(*hcl_only), batch()[:1])
    model = build("SOLVER.IMS_PER_BATCH", 1, "MODEL.DRCL2.HEAD_NORM", "LN", *hcl_only)
    losses = step_data(model, batch()[:1])
    assert all(torch.isfinite(v) for v in losses.values())


def test_sr_on_p6_uses_the_backbone_stride(monkeypatch):
    """
    SR on p6 (stride 64) over 96 px wide images: p6 has 2 columns. One masked patch, x in [48, 64)
    (box-guided into the only box), lies in column 0. Catches: a stride taken from the feature
    width (96 // 2 = 48), which puts it in column 1.
    """
    from drcl2.modeling import reconstruction_heads

    seen = []
    original = reconstruction_heads.semantic_reconstruction_loss
    monkeypatch.setattr(
        reconstruction_heads,
        "semantic_reconstruction_loss",
        lambda pred, target, masked, *a, **k: (
            seen.append(masked) or original(pred, target, masked, *a, **k)
        ),
    )
    model = build(
        "MODEL.DRCL2.SR.IN_FEATURES",
        ["p3", "p6"],
        "MODEL.DRCL2.MASK.RATIO",
        0.05,
        "MODEL.DRCL2.MASK.BOX_GUIDED",
        1.0,
        "MODEL.DRCL2.HCL.ENABLED",
        False,
        "MODEL.DRCL2.LCL.ENABLED",
        False,
        *NO_AR,
        *NO_RPN,
    )
    data = batch()
    for x in data:
        for v in ("view1", "view2"):
            x[v] = view(7, (64, 96), [[48, 0, 64, 16]], [0])
    step_data(model, data)
    _, pixels = model_draws(model, data, 0)
    pixels = torch.stack(pixels)
    assert pixels[:, :16, 48:64].all() and pixels.sum() == 2 * 16 * 16
    assert seen[1].tolist() == [[[True, False]]] * 2


# the paper's ablation rows, each config adding one part to the one before; the last is the method
ABLATIONS = {
    "ablations/pretrain_det": set(),
    "ablations/pretrain_hcl": {"loss_hcl"},
    "ablations/pretrain_hlcl": {"loss_hcl", "loss_lcl_inst", "loss_lcl_sup"},
    "ablations/pretrain_hlcl_drb": {"loss_hcl", "loss_lcl_inst", "loss_lcl_sup"},
    "ablations/pretrain_hlcl_drb_ar": {"loss_hcl", "loss_lcl_inst", "loss_lcl_sup", "loss_ar"},
    "pretrain_2drcl": LOSS_KEYS - {"loss_rpn_cls", "loss_rpn_loc"},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_rows_switch_the_parts(name):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", name + ".yaml"))
    # The row's switches on the tiny model so that it builds fast.
    tiny = tiny_cfg()
    tiny.MODEL.DRCL2 = cfg.MODEL.DRCL2
    tiny.MODEL.MASK_ON = False  # the tiny batch carries no masks
    assert cfg.MODEL.DRCL2.DET.ENABLED and cfg.MODEL.MASK_ON  # every row of 2DRCL v2
    tiny.DATALOADER.SAMPLER_TRAIN = cfg.DATALOADER.SAMPLER_TRAIN
    torch.manual_seed(0)
    model = hand_over_drb(build_model(tiny).train(), tiny)
    losses, _ = step(model)
    assert set(losses) == ABLATIONS[name] | {
        "loss_rpn_cls",
        "loss_rpn_loc",
        "loss_cls",
        "loss_box_reg",
    }
    drb = "drb" in name or name == "pretrain_2drcl"
    assert model.drb == drb
    dynamic = cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler"
    assert dynamic == drb


@pytest.mark.parametrize(
    "drb,sampler",
    [(True, "RepeatFactorTrainingSampler"), (False, "DynamicRepeatFactorTrainingSampler")],
)
def test_drb_switches_both_halves_together(drb, sampler):
    """One half of DRB without the other (class weights vs sampler) is refused, naming both keys."""
    with pytest.raises(ValueError, match="MODEL.DRCL2.DRB.ENABLED.*DATALOADER.SAMPLER_TRAIN"):
        check_drcl2_config(
            tiny_cfg("MODEL.DRCL2.DRB.ENABLED", drb, "DATALOADER.SAMPLER_TRAIN", sampler)
        )


def test_all_parts_off_fails():
    opts = []
    for part in ("HCL", "LCL", "AR", "SR", "RPN"):
        opts += [f"MODEL.DRCL2.{part}.ENABLED", False]
    with pytest.raises(ValueError, match="every part is off"):
        check_drcl2_config(tiny_cfg(*opts))


def test_inference_is_refused_with_a_pointer_to_export():
    model = build()
    model.eval()
    with pytest.raises(RuntimeError, match="export_weights"):
        model(batch())


def test_losses_and_norms_stay_float32_under_cpu_autocast():
    """The AMP code path on CPU (bfloat16 autocast): every loss comes out in float32."""
    model = build()
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch())
    assert set(losses) == LOSS_KEYS
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_step_on_gpu_with_amp():
    model = build("MODEL.DEVICE", "cuda")
    with EventStorage(0), torch.autocast("cuda", dtype=torch.float16):
        losses = model(batch())
    assert set(losses) == LOSS_KEYS
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_rpn_losses_only_equals_detectron2_rpn_forward():
    from detectron2.structures import ImageList

    from drcl2.modeling.rpn_losses import rpn_losses_only

    model = build()
    images, instances1, _ = model.preprocess(batch())
    x = images.tensor[:2]
    features = model.backbone(x)
    with EventStorage(0):  # the RPN logs its anchor statistics
        torch.manual_seed(1)
        ours = rpn_losses_only(model.proposal_generator, features, instances1)
        torch.manual_seed(1)
        _, theirs = model.proposal_generator(
            ImageList(x, images.image_sizes[:2]), features, instances1
        )
    assert set(ours) == set(theirs) == {"loss_rpn_cls", "loss_rpn_loc"}
    for k in ours:
        assert torch.allclose(ours[k], theirs[k]), k
