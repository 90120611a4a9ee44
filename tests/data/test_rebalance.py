"""Dynamic rebalancing maths (drcl2.data.rebalance): statistics, factors, weights, schedule."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler

from drcl2.data.rebalance import (
    RebalanceSchedule,
    class_statistics,
    class_weights,
    repeat_factors,
    sample_instances,
)


def long_tailed_dicts(num_images=2000, num_classes=100, empty_every=17, seed=0):
    """A generated long-tailed set: class c is ~ c^-2 frequent, some images have no annotations."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_classes + 1, dtype=np.float64) ** -2.0
    p /= p.sum()
    dicts = []
    for i in range(num_images):
        n = 0 if i % empty_every == 0 else int(rng.integers(1, 12))
        classes = rng.choice(num_classes, size=n, p=p)
        dicts.append({"image_id": i, "annotations": [{"category_id": int(c)} for c in classes]})
    return dicts


def chi2_critical(dof, z=3.09):
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def brute_force(dicts, t):
    """docs/method.md's DRB formulas written out literally, in Python floats."""
    num_images = len(dicts)
    all_classes = [a["category_id"] for d in dicts for a in d["annotations"]]
    img_count = Counter(c for d in dicts for c in {a["category_id"] for a in d["annotations"]})
    ins_count = Counter(all_classes)
    f_img = {c: img_count[c] / num_images for c in img_count}
    f_ins = {c: ins_count[c] / len(all_classes) for c in ins_count}
    r_img = {c: max(1.0, math.sqrt(t / f_img[c])) for c in f_img}
    r_ins = {c: max(1.0, math.sqrt(t / math.sqrt(f_img[c] * f_ins[c]))) for c in f_img}

    def r_image(lam):
        out = []
        for d in dicts:
            cs = {a["category_id"] for a in d["annotations"]}
            if not cs:
                out.append(1.0)
            else:
                out.append((1 - lam) * max(r_img[c] for c in cs) + lam * max(r_ins[c] for c in cs))
        return out

    return f_img, f_ins, r_img, r_ins, r_image


@pytest.fixture(scope="module")
def dicts():
    return long_tailed_dicts()


@pytest.mark.parametrize("t", [0.001, 0.01, 0.1])
def test_lambda0_parity_with_detectron2(dicts, t):
    ours = repeat_factors(dicts, repeat_thresh=t, lam=0.0)
    theirs = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)  # exact, element for element
    assert (ours > 1).any(), "the test set should exercise repeats"
    empty = [i for i, d in enumerate(dicts) if not d["annotations"]]
    assert empty and bool((ours[empty] == 1.0).all())


def test_class_statistics_match_definition(dicts):
    f_img, f_ins = class_statistics(dicts, num_classes=128)
    ref_img, ref_ins, *_ = brute_force(dicts, 0.001)
    assert f_img.shape == f_ins.shape == (128,)
    for c in range(128):
        assert f_img[c].item() == pytest.approx(ref_img.get(c, 0.0), abs=1e-15)
        assert f_ins[c].item() == pytest.approx(ref_ins.get(c, 0.0), abs=1e-15)
    assert f_ins.sum().item() == pytest.approx(1.0)
    # num_classes defaults to max id + 1
    assert class_statistics(dicts).image_fraction.shape == (max(ref_img) + 1,)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_repeat_factors_match_definition(dicts, lam):
    *_, r_image = brute_force(dicts, 0.01)
    ours = repeat_factors(dicts, repeat_thresh=0.01, lam=lam)
    torch.testing.assert_close(ours, torch.tensor(r_image(lam), dtype=torch.float32))


def test_instance_level_factors_differ_and_favour_rare(dicts):
    r0 = repeat_factors(dicts, 0.01, lam=0.0)
    r1 = repeat_factors(dicts, 0.01, lam=1.0)
    assert not torch.equal(r0, r1)
    assert (r1 >= 1).all() and (r0 >= 1).all()


def test_class_weights(dicts):
    _, _, _, r_ins, _ = brute_force(dicts, 0.01)
    w0 = class_weights(dicts, 0.01, lam=0.0, num_classes=128)
    w1 = class_weights(dicts, 0.01, lam=1.0, num_classes=128)
    wh = class_weights(dicts, 0.01, lam=0.5, num_classes=128)
    assert w0.shape == (128,) and torch.equal(w0, torch.ones(128))
    ref = torch.tensor([r_ins.get(c, 1.0) for c in range(128)], dtype=torch.float32)
    torch.testing.assert_close(w1, ref)
    torch.testing.assert_close(wh, ref.sqrt())
    assert w1.max() > 1  # rare classes are up-weighted


def _plackett_luce_probs(weights, k):
    """Exact probabilities of each ordered k-draw without replacement ∝ weights."""
    n = len(weights)
    probs = {}
    for seq in itertools.permutations(range(n), k):
        p, left = 1.0, sum(weights)
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        probs[seq] = p
    return probs


def test_sample_instances_frequencies_match_weights():
    gt_classes = torch.tensor([0, 1, 1, 2, 3])
    w = torch.tensor([1.0, 2.0, 5.0, 0.5])
    inst_w = w[gt_classes].tolist()
    g = torch.Generator().manual_seed(1234)
    trials = 20000

    # k = 1: frequencies of each instance ∝ its class weight
    counts = Counter(sample_instances(gt_classes, w, 1, generator=g).item() for _ in range(trials))
    expected = np.array(inst_w) / sum(inst_w) * trials
    observed = np.array([counts[i] for i in range(5)])
    chi2 = (((observed - expected) ** 2) / expected).sum()
    assert chi2 < chi2_critical(4), (observed, expected)

    # k = 2: the set drawn follows sequential draws without replacement (Plackett-Luce)
    exact = Counter()
    for seq, p in _plackett_luce_probs(inst_w, 2).items():
        exact[frozenset(seq)] += p
    draws = Counter()
    for _ in range(trials):
        idx = sample_instances(gt_classes, w, 2, generator=g)
        assert idx.dtype == torch.long and len(set(idx.tolist())) == 2
        draws[frozenset(idx.tolist())] += 1
    keys = sorted(exact, key=sorted)
    expected = np.array([exact[s] * trials for s in keys])
    observed = np.array([draws[s] for s in keys])
    chi2 = (((observed - expected) ** 2) / expected).sum()
    assert chi2 < chi2_critical(len(keys) - 1), (observed, expected)


def test_sample_instances_uniform_weights_and_small_images():
    gt = torch.tensor([3, 3, 1])
    w = torch.ones(4)
    assert torch.equal(sample_instances(gt, w, 8), torch.arange(3))
    assert torch.equal(sample_instances(gt, w, 3), torch.arange(3))
    assert sample_instances(gt, w, 0).numel() == 0
    assert sample_instances(torch.zeros(0, dtype=torch.long), w, 8).numel() == 0
    g = torch.Generator().manual_seed(0)
    out = sample_instances(torch.arange(4).repeat(5), w, 8, generator=g)
    assert out.shape == (8,) and out.unique().numel() == 8 and out.max() < 20
    with pytest.raises(ValueError):
        sample_instances(gt, w, -1)


def test_sample_instances_is_reproducible():
    gt = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(0))
    w = torch.linspace(1, 5, 10)
    a = sample_instances(gt, w, 8, generator=torch.Generator().manual_seed(7))
    b = sample_instances(gt, w, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_instances_cuda():
    gt = torch.tensor([0, 1, 1, 2, 3] * 4, device="cuda")
    w = torch.tensor([1.0, 2.0, 5.0, 0.5])  # weights on the CPU are moved to the instances' device
    g = torch.Generator(device="cuda").manual_seed(0)
    out = sample_instances(gt, w, 8, generator=g)
    assert out.device.type == "cuda" and out.dtype == torch.long and out.unique().numel() == 8
    assert torch.equal(sample_instances(gt[:3], w, 8), torch.arange(3, device="cuda"))
    # frequencies on the GPU follow the weights too
    draws = torch.stack([sample_instances(gt[:5], w.cuda(), 1, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten().cpu(), minlength=5).double() / 4000
    expected = w[gt[:5].cpu()].double() / w[gt[:5].cpu()].sum()
    assert torch.allclose(freq, expected, atol=0.03)


def test_schedule_values():
    lin = RebalanceSchedule(0.2, 0.6, "linear")
    assert lin.lam(0.0) == 0.0 and lin.lam(0.2) == 0.0
    assert lin.lam(0.4) == pytest.approx(0.5)
    assert lin.lam(0.6) == 1.0 and lin.lam(1.0) == 1.0 and lin.lam(7.0) == 1.0
    cos = RebalanceSchedule(0.0, 1.0, "cosine")
    assert cos.lam(0.0) == 0.0 and cos.lam(1.0) == 1.0
    assert cos.lam(0.5) == pytest.approx(0.5)
    assert cos.lam(0.25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    values = [cos.lam(p / 100) for p in range(101)]
    assert values == sorted(values)  # monotone
    step = RebalanceSchedule(0.5, 0.5)
    assert step.lam(0.49) == 0.0 and step.lam(0.5) == 1.0
    assert RebalanceSchedule().lam(0.3) == pytest.approx(0.3)  # defaults: 0 -> 1, linear


def test_bad_input_raises_clear_errors(dicts):
    with pytest.raises(ValueError, match="start"):
        RebalanceSchedule(0.8, 0.2)
    with pytest.raises(ValueError, match="mode"):
        RebalanceSchedule(0.0, 1.0, "exponential")
    with pytest.raises(ValueError, match="start and end"):
        RebalanceSchedule(-0.1, 1.0)
    for t in (0.0, -0.001, float("nan")):
        with pytest.raises(ValueError, match="repeat_thresh"):
            repeat_factors(dicts, repeat_thresh=t)
        with pytest.raises(ValueError, match="repeat_thresh"):
            class_weights(dicts, repeat_thresh=t)
    with pytest.raises(ValueError, match="empty"):
        repeat_factors([])
    with pytest.raises(ValueError, match="empty"):
        class_statistics([])
    with pytest.raises(ValueError, match="lam"):
        repeat_factors(dicts, lam=1.5)
    with pytest.raises(ValueError, match="out of range"):
        class_statistics(dicts, num_classes=3)
    with pytest.raises(ValueError, match="category_id"):
        repeat_factors([{"annotations": [{"category_id": "dog"}]}])


def test_dataset_without_annotations():
    dicts = [{"annotations": []}, {}]
    assert torch.equal(repeat_factors(dicts, lam=0.7), torch.ones(2))
    f_img, f_ins = class_statistics(dicts, num_classes=2)
    assert torch.equal(f_img, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(class_weights(dicts, lam=1.0, num_classes=2), torch.ones(2))
