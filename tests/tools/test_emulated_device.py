"""
The emulated accelerator (tests/helpers/emulated_device.py, DRCL2_TEST_DEVICE=emulated): on the CPU,
a test mixing tensors of the model's device with host tensors fails as it would on a GPU, and what
CUDA allows passes; the device check's test selection passes under it.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from helpers import REPO_ROOT, cfg_from
from helpers.emulated_device import DEVICE, EmulatedDevice, EmulatedDeviceError
from torch.nn import functional as F

from drcl2.tools import device_check

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mode(emulated_device):
    """The emulated device: conftest's when DRCL2_TEST_DEVICE=emulated, else one for the test."""
    if emulated_device is not None:
        yield emulated_device
        return
    with EmulatedDevice() as m:
        yield m


def tiny_module():
    """A module moved to the model's device, as build_model moves a detector."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 5)
    module.register_buffer("weights", torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0]))
    return module.to(DEVICE)


@pytest.mark.parametrize(
    "known",
    [
        "allclose(model buffer, torch.ones(5))",  # test_class_statistics_are_buffers_...
        "cross_entropy(logits, torch.arange(n))",  # test_meta_arch._info_nce
        "allclose(host copy the model handed out, model tensor)",  # test_late_iteration_...
    ],
)
def test_the_three_mixes_that_fail_on_cuda_raise(mode, known):
    module = tiny_module()
    logits = module(torch.ones(4, 3).to(DEVICE))
    w = module.weights**0.5
    with pytest.raises(EmulatedDeviceError, match="host tensors"):
        if known.startswith("allclose(model buffer"):
            torch.allclose(module.weights, torch.ones(5))
        elif known.startswith("cross_entropy"):
            F.cross_entropy(logits, torch.arange(len(logits)))
        else:
            torch.allclose(w.cpu(), w)


def test_other_mixes_that_fail_on_cuda_raise(mode):
    module = tiny_module()
    w = module.weights
    for mix in (
        lambda: torch.equal(w, torch.ones(5)),
        lambda: w + torch.ones(5),  # a device 0-dim tensor does not rescue a host operand
        lambda: torch.ones(5) * w.sum(),
        lambda: torch.cat([w, torch.zeros(2)]),
        lambda: torch.zeros(5)[torch.arange(2, device=w.device)],  # host indexed by device
        lambda: w.numpy(),
        lambda: module(torch.ones(4, 3)),  # host input into the model's weights
    ):
        with pytest.raises(EmulatedDeviceError):
            mix()


def test_what_cuda_allows_passes(mode):
    module = tiny_module()
    w = module.weights
    assert w.device == DEVICE and torch.ones(1).device == torch.device("cpu")
    assert (w * torch.tensor(2.0)).device == DEVICE  # a host 0-dim tensor is a CPU scalar
    assert torch.equal(w[torch.tensor([0, 4])], torch.tensor([1.0, 3.0], device=w.device))
    assert w[w > 1].device == DEVICE and w[torch.tensor([True] * 5)].device == DEVICE
    made = torch.zeros(5, device=w.device)  # devices passed along place as on CUDA
    made[torch.tensor([1])] = torch.tensor([7.0])  # assigning a host value into a device tensor
    made.copy_(torch.arange(5.0))  # copies between devices
    assert made.device == DEVICE and made.new_ones(2).device == DEVICE
    host = w.cpu()
    assert host.device == torch.device("cpu") and w.device == DEVICE  # a move copies
    assert torch.allclose(host.to(w.device), w)
    assert torch.ones(5).to(w).device == DEVICE and float(w.sum()) == 8.0
    # a training step: gradients, an optimizer, a state dict loaded from host tensors
    labels = torch.zeros(4, dtype=torch.long).to(w.device)
    loss = F.cross_entropy(module(torch.ones(4, 3, device=w.device)), labels)
    loss.backward()
    assert module.weight.grad.device == DEVICE
    torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9).step()
    state = {k: v.cpu() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    assert module.weight.device == DEVICE
    # a deep copy of host and device tensors together (its memo holds both) keeps each in place
    copied = copy.deepcopy({"host": torch.ones(3), "module": module})
    assert (
        copied["host"].device == torch.device("cpu") and copied["module"].weights.device == DEVICE
    )


def test_the_model_runs_on_the_emulated_device_and_its_own_mixes_raise(mode, monkeypatch):
    """The mode reaches the model's code too: a DRCL2 step on cpu:0 trains on the emulated
    device (losses and gradients there), and the model making a tensor without a device where
    it meets its own fails."""
    from helpers.model import NO_AR, NO_RPN, build, step

    model = build("MODEL.DEVICE", str(DEVICE), *NO_AR, *NO_RPN)
    assert model.device == DEVICE and model.pixel_mean.device == DEVICE
    losses, _ = step(model)
    assert losses and all(v.device == DEVICE for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad.device == DEVICE

    def valid_pixels_on_the_host(image_sizes, padded_size):  # the device argument forgotten
        valid = torch.zeros((len(image_sizes), *padded_size), dtype=torch.bool)
        for i, (h, w) in enumerate(image_sizes):
            valid[i, :h, :w] = True
        return valid

    monkeypatch.setattr(model, "_valid_pixels", valid_pixels_on_the_host)
    with pytest.raises(EmulatedDeviceError, match="host tensors"):
        step(model)


def test_cfg_and_build_model_place_the_model_on_the_emulated_device(mode):
    model = build_model(
        cfg_from("configs/toy/mask_rcnn_finetune.yaml", "MODEL.DEVICE", str(DEVICE))
    )
    assert all(p.device == DEVICE for p in model.parameters())


@pytest.mark.slow
def test_the_device_checks_test_selection_passes_on_the_emulated_device():
    """What the device check's dry run runs in its tests step (about 40 s on 2 busy cores)."""
    env = dict(os.environ, DRCL2_TEST_DEVICE="emulated")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *device_check.DRY_TESTS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
