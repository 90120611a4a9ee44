"""
Not collected by default (not test_*.py): a test with the bug the device check's dry run must
catch, run by tests/tools/test_device_check.py. It compares a tensor of a module on the model's
device with one made on the host: it passes on the CPU and fails on a GPU, and on the emulated
device.
"""

import torch
from helpers import TEST_DEVICE


def test_compares_a_buffer_with_a_host_tensor():
    module = torch.nn.Module()
    module.register_buffer("weights", torch.ones(5))
    module.to(TEST_DEVICE)
    assert torch.allclose(module.weights**0.5, torch.ones(5))  # torch.ones(5) is on the host
