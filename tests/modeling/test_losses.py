"""Pure maths of 2DRCL: losses, masking and the EMA rule, against small hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from drcl2.modeling.ema import cosine_momentum, make_target, momentum_update
from drcl2.modeling.losses import (
    appearance_reconstruction_loss,
    balanced_supervised_contrastive_loss,
    byol_loss,
    decorrelation_loss,
    info_nce_loss,
    semantic_reconstruction_loss,
)
from drcl2.modeling.masking import box_guided_patch_mask, mask_at_stride, patch_mask_to_pixels


def test_byol_loss_hand_computed():
    online = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    # cos = 1/sqrt(2) and -1: mean(2 - 2cos) = ((2 - sqrt(2)) + 4) / 2
    loss = byol_loss(online, target)
    assert loss.item() == pytest.approx((2 - math.sqrt(2) + 4) / 2, abs=1e-6)
    loss.backward()
    assert online.grad is not None and online.grad.abs().sum() > 0
    assert byol_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4)).item() == 0.0


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    # logits = [2, 0, -2]; positive 0
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert info_nce_loss(q, k, torch.tensor([0]), tau).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_supcon_hand_computed():
    tau = 1.0
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u_cls = torch.tensor([0, 1])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    v_cls = torch.tensor([0, 1, 1])
    w = torch.tensor([3.0, 1.0])
    e = math.exp
    # instance 0 (class 0): sims to v = [1, 0, 0.6]; D = 1/1 e^1 + 1/2 (e^0 + e^0.6)
    d0 = e(1) + 0.5 * (1 + e(0.6))
    l0 = -(1.0 / 1) * math.log(e(1) / d0)
    # instance 1 (class 1): sims [0, 1, 0.8]; D = e^0 + 1/2 (e^1 + e^0.8); P = {1, 2}
    d1 = 1 + 0.5 * (e(1) + e(0.8))
    l1 = -0.5 * (math.log(e(1) / d1) + math.log(e(0.8) / d1))
    expected = (3 * l0 + 1 * l1) / 4
    got = balanced_supervised_contrastive_loss(u, u_cls, w, v, v_cls, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Class balance: duplicating a class's target embedding leaves the denominators unchanged.
    v2, v2_cls = torch.cat([v, v[:1]]), torch.cat([v_cls, v_cls[:1]])
    got2 = balanced_supervised_contrastive_loss(u[1:], u_cls[1:], w[1:], v2, v2_cls, tau)
    assert got2.item() == pytest.approx(l1, rel=1e-6)
    with pytest.raises(ValueError, match="no target"):
        balanced_supervised_contrastive_loss(u, torch.tensor([0, 5]), w, v, v_cls, tau)


def test_reconstruction_losses_ignore_padding_and_weight_visible():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([1.0, 2.0, 3.0, 100.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    masked = torch.tensor([[[True, False], [False, False]]])
    valid = torch.tensor([[[True, True], [True, False]]])  # last pixel is padding
    # masked mean = 1; visible mean over (2, 3) = 2.5
    loss = appearance_reconstruction_loss(pred, target, masked, valid, 0.1)
    assert loss.item() == pytest.approx(1 + 0.1 * 2.5)

    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # two locations
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    m = torch.tensor([[[False, True]]])
    v = torch.ones(1, 1, 2, dtype=torch.bool)
    # location 0: cos 1 (visible, weight 0.1); location 1: cos 0 (masked, weight 1)
    assert semantic_reconstruction_loss(p, t, m, v, 0.1).item() == pytest.approx(1.0 / 1.1)


def test_box_guided_masking_counts_and_boxes():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # holds the 4 top-left 16 px patches
    mask = box_guided_patch_mask((64, 64), 16, 0.5, boxes, torch.ones(1), 0.5, generator=g)
    assert mask.shape == (4, 4) and int(mask.sum()) == 8
    assert int(mask[:2, :2].sum()) >= 4  # 4 of 8 drawn inside the box (the rest anywhere)
    # All masked patches inside the box when the fraction is 1 and the box is large enough.
    mask = box_guided_patch_mask((64, 64), 16, 0.25, boxes, torch.ones(1), 1.0, generator=g)
    assert int(mask.sum()) == 4 and bool(mask[:2, :2].all())
    # Weighted: the heavier box gets its patch chosen first.
    two = torch.tensor([[0.0, 0.0, 16.0, 16.0], [48.0, 48.0, 64.0, 64.0]])
    hits = 0
    for s in range(50):
        m = box_guided_patch_mask(
            (64, 64),
            16,
            1 / 16,
            two,
            torch.tensor([1.0, 9.0]),
            1.0,
            generator=torch.Generator().manual_seed(s),
        )
        hits += int(m[3, 3])
    assert hits > 35
    # No boxes: all drawn uniformly; ratio 0: nothing masked.
    assert (
        int(box_guided_patch_mask((50, 70), 16, 0.5, torch.zeros(0, 4), torch.zeros(0), 0.5).sum())
        == 10
    )
    assert int(box_guided_patch_mask((64, 64), 16, 0.0, boxes, torch.ones(1), 0.5).sum()) == 0


def test_pixel_and_stride_masks():
    patches = torch.tensor([[True, False], [False, False]])
    pixels = patch_mask_to_pixels(patches, 4, (8, 12))
    assert pixels.shape == (8, 12) and int(pixels.sum()) == 16 and bool(pixels[:4, :4].all())
    at8 = mask_at_stride(pixels[None], 8, (1, 2))
    assert at8.tolist() == [[[True, False]]]


def test_cosine_momentum_and_ema_rule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(2.0)
    before = target[0].weight.clone()
    momentum_update(online, target, 0.9)
    assert torch.allclose(target[0].weight, 0.9 * before + 0.1 * online[0].weight)
    assert torch.allclose(target[1].running_mean, torch.full((2,), 0.2))


def test_normalizers_replace_the_local_counts():
    """
    ``normalizer`` divides the summed loss (what the model passes under DDP: global count / world
    size). Catches: a loss that keeps averaging over its own items when given one.
    """
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    cls, tcls, w = (
        torch.tensor([0, 1, 1]),
        torch.tensor([0, 1, 1, 0, 2]),
        torch.tensor([1.0, 2.0, 2.0]),
    )
    assert byol_loss(z, t[:3], normalizer=6.0) * 6 == pytest.approx(byol_loss(z, t[:3]).item() * 3)
    pos = torch.tensor([0, 1, 2])
    assert info_nce_loss(z, t, pos, 0.2, normalizer=6.0) * 6 == pytest.approx(
        info_nce_loss(z, t, pos, 0.2).item() * 3
    )
    sup = balanced_supervised_contrastive_loss(z, cls, w, t, tcls, 0.2)
    assert balanced_supervised_contrastive_loss(
        z, cls, w, t, tcls, 0.2, normalizer=10.0
    ) * 10 == pytest.approx(sup.item() * 5)
    pred, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    masked = torch.tensor([[[True, False], [False, False]]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    ar = appearance_reconstruction_loss(
        pred, target, masked, valid, 0.1, normalizers=(2.0, torch.tensor(6.0))
    )
    assert ar.item() == pytest.approx(1 / 2 + 0.1 * 3 / 6)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)  # nothing masked anywhere: 0 / 0 counts as 0
    assert (
        appearance_reconstruction_loss(
            pred, target, empty, valid, 0.0, normalizers=(0.0, 4.0)
        ).item()
        == 0.0
    )
    sr = semantic_reconstruction_loss(
        torch.ones(1, 2, 2, 2), -torch.ones(1, 2, 2, 2), masked, valid, 0.1
    )
    assert semantic_reconstruction_loss(
        torch.ones(1, 2, 2, 2), -torch.ones(1, 2, 2, 2), masked, valid, 0.1, normalizer=2.6
    ).item() * 2.6 == pytest.approx(sr.item() * 1.3)


@pytest.mark.parametrize(
    "norm,sizes,trains",
    [
        ("naiveSyncBN_N", [1, 1], True),  # one image per GPU: global statistics over 2
        ("naiveSyncBN_N", [3, 0], True),  # a rank without instances
        ("naiveSyncBN_N", [1, 0], False),
        ("naiveSyncBN_N", [1], False),  # one process, one image
        ("naiveSyncBN", [2, 0], False),  # stats_mode "" needs every rank non-empty
        ("naiveSyncBN", [1, 1], True),
        ("BN", [3, 1], False),  # per-rank statistics
        ("BN", [2, 2], True),
        ("LN", [1, 0], True),  # no batch statistics
        ("LN", [0, 0], False),  # nothing at all
    ],
)
def test_batch_norm_trains_on_a_split_batch(norm, sizes, trains):
    from drcl2.modeling.blocks import MLPHead
    from drcl2.modeling.distributed import batch_norm_trains

    assert batch_norm_trains(sizes, MLPHead(4, 8, 4, norm)) is trains


def test_decorrelation_loss_hand_computed():
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    b = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert decorrelation_loss(torch.stack([a, b], dim=1)).item() == pytest.approx(0.0, abs=1e-6)
    # one signal up to scale and sign: |r| = 1; eps lowers it by var / (var + eps) only
    rank_one = torch.stack([a + 0.5 * b, -3.0 * (a + 0.5 * b)], dim=1)
    assert decorrelation_loss(rank_one).item() == pytest.approx(1.0, abs=1e-3)
    # r = 0.6 between the first two of three channels: 2 * 0.36 / (3 * 2)
    c = torch.tensor([1.0, -1.0, -1.0, 1.0])
    x = torch.stack([a, 0.6 * a + 0.8 * b, c], dim=1)
    assert decorrelation_loss(x).item() == pytest.approx(2 * 0.36 / 6, abs=1e-4)
    # scale-free: per channel (within what eps leaves alone) and as a whole
    assert decorrelation_loss(x * torch.tensor([3.0, 0.5, 2.0])).item() == pytest.approx(
        2 * 0.36 / 6, abs=1e-3
    )
    assert decorrelation_loss(x * 1e-4).item() == pytest.approx(2 * 0.36 / 6, abs=1e-4)
    noise = torch.randn((4000, 8), generator=torch.Generator().manual_seed(0))
    assert decorrelation_loss(noise).item() < 0.01
    with pytest.raises(ValueError, match="2 samples"):
        decorrelation_loss(torch.zeros((1, 8)))


def test_minimising_decorrelation_raises_the_effective_rank():
    """The gradient points away from collapse: nearly rank-1 features become full-rank."""
    from drcl2.evaluation.health import rankme

    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn((256, 1), generator=g) * torch.randn((1, 16), generator=g)
    x = (collapsed + 0.01 * torch.randn((256, 16), generator=g)).requires_grad_(True)
    before, start = rankme(x.detach()), decorrelation_loss(x).item()
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        decorrelation_loss(x).backward()
        optimizer.step()
    assert before < 2.0 and start > 0.9
    assert decorrelation_loss(x).item() < 0.05
    assert rankme(x.detach()) > 10.0
