"""
An emulated accelerator for the model tests on the CPU (``DRCL2_TEST_DEVICE=emulated``).

Why. On a GPU (``python -m drcl2.tools.device_check``, ``DRCL2_TEST_DEVICE=cuda``) the model lives
on CUDA while every tensor made without a device lives on the CPU, and an op mixing the two fails
("Expected all tensors to be on the same device"). On the CPU both are one device: a test that
compares a tensor of the model with ``torch.ones(5)`` passes here and fails on the GPU day. The
device check's dry run, on the CPU, could not see that; with this mode it does.

How. The CPU plays two devices, told apart by a tag on every tensor, and a
:class:`torch.overrides.TorchFunctionMode` (:class:`EmulatedDevice`, on through each test, model
building included; ``tests/conftest.py``) applies CUDA's placement rules to the tags:

* The model's device is ``cpu:0`` (:data:`DEVICE`; ``MODEL.DEVICE`` of the tests' configs): a
  tensor made or moved with an explicit device of index 0 (``model.to(cfg.MODEL.DEVICE)``,
  ``torch.zeros(..., device=self.device)``, ``x.to(self.device)``) is tagged *device*. Made
  without a device or with a plain ``"cpu"``, or moved by ``.cpu()`` / ``.to("cpu")``, it is
  tagged *host*. A move to the other tag returns a copy, as on CUDA (the source keeps its tag).
* ``Tensor.device`` of a *device* tensor reads ``cpu:0``, so code that passes devices along
  (``device=x.device``, the model's ``self.device``) places what it makes as it would on CUDA;
  ``.grad`` and ``.data`` take their tensor's tag, and setting ``.data`` moves the tag along
  (how ``nn.Module.to`` moves parameters).
* Any other op's result is tagged *device* when an argument is, else *host* when an argument is,
  else not at all (untagged: tensors made before the test, or by C++ code the mode does not see;
  these mix with either tag, so they can hide a bug but never raise a false alarm).
* An op with arguments of both tags raises :class:`EmulatedDeviceError` naming the op, unless
  every *host* argument is 0-dim (CUDA takes CPU scalars). So do ``.numpy()`` / ``__array__`` of
  a *device* tensor and indexing a *host* tensor with *device* indices. Moves (``.to``, ``.cpu``,
  ``copy_``, ``.data =``), indexing a *device* tensor with *host* indices and assigning into one
  are allowed, as on CUDA.

The checks run at each op's Python entry (``F.cross_entropy`` as a whole, not its aten ops), and
the tags follow Python tensor objects, not storages: close enough to CUDA's rules for the tests'
own code, which is what this mode is for (the GPU run of the device check stays the proof).
"""

from types import GetSetDescriptorType
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DEVICE", "EmulatedDevice", "EmulatedDeviceError"]

DEVICE = torch.device("cpu", 0)  # the emulated accelerator: the model's device
ON_DEVICE, ON_HOST = "device", "host"


class EmulatedDeviceError(RuntimeError):
    """An op mixed tensors of the model's device with host tensors: it would fail on CUDA."""


def _target(device) -> str:
    """The tag of an explicit device argument (str, int or torch.device)."""
    if isinstance(device, int):  # a CUDA ordinal
        return ON_DEVICE
    device = torch.device(device)
    return ON_DEVICE if device.type != "cpu" or device.index is not None else ON_HOST


def _descriptor(func) -> Optional[str]:
    """'device.__get__', 'data.__set__', ... for a Tensor property's getter / setter, else None."""
    owner = getattr(func, "__self__", None)
    if isinstance(owner, GetSetDescriptorType):
        return f"{owner.__name__}.{func.__name__}"
    return None


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class EmulatedDevice(TorchFunctionMode):
    """The CPU as two devices (see the module doc): ``with EmulatedDevice(): ...``."""

    def __init__(self):
        super().__init__()
        self.tags = WeakIdKeyDictionary()

    # ------------------------------------------------------------------------------------------
    def tag(self, t) -> Optional[str]:
        return self.tags.get(t) if isinstance(t, torch.Tensor) else None

    def _set(self, outputs, tag, inputs=()) -> None:
        """Tag the tensors of ``outputs`` that are not among ``inputs`` (an in-place op's result
        keeps its tag)."""
        if tag is None:
            return
        seen = {id(t) for t in inputs}
        for t in tree_leaves(outputs):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                self.tags[t] = tag

    def _placed(self, result, source, tag):
        """``result`` of moving ``source`` to ``tag``: a copy when the CPU gave back the source
        itself and the tags differ (on CUDA a move between devices copies)."""
        if result is source and self.tag(source) != tag:
            result = source.clone()
        self.tags[result] = tag
        return result

    def _fail(self, func, why: str):
        raise EmulatedDeviceError(
            f"{_name(func)}: {why} (the model's device is emulated on the CPU, "
            "DRCL2_TEST_DEVICE=emulated; on a GPU this op would fail: put both on the model's "
            "device, e.g. torch.ones(5, device=w.device) or x.to(w.device))"
        )

    def _check_mix(self, func, tensors) -> Optional[str]:
        """The result's tag; raise when device tensors meet host tensors with dimensions."""
        tags = [self.tag(t) for t in tensors]
        if ON_DEVICE in tags:
            host = [t for t, g in zip(tensors, tags) if g == ON_HOST and t.dim() > 0]
            if host:
                shapes = [tuple(t.shape) for t in host]
                self._fail(func, f"tensors on the model's device mixed with host tensors {shapes}")
            return ON_DEVICE
        return ON_HOST if ON_HOST in tags else None

    # ------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        prop = _descriptor(func)
        if prop is not None:
            return self._property(func, prop, args)
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.cpu:
            return self._placed(func(*args, **kwargs), args[0], ON_HOST)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and self.tag(args[0]) == ON_DEVICE:
            self._fail(func, "a tensor on the model's device converted to numpy (use .cpu())")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            return self._index(func, args, kwargs)
        if func is torch.Tensor.copy_:
            return func(*args, **kwargs)  # a copy between devices is allowed
        if func is torch.Tensor.__deepcopy__:  # (self, memo): the memo holds unrelated tensors
            result = func(*args, **kwargs)
            self._set(result, self.tag(args[0]), [args[0]])
            return result
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if kwargs.get("device") is not None:  # a factory (or new_*, *_like) with a device
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                source = next((t for t in tensors if t is result), None)
                result = self._placed(result, source, _target(kwargs["device"]))
            return result
        tag = self._check_mix(func, tensors) if tensors else ON_HOST  # no tensor in: a factory
        result = func(*args, **kwargs)
        self._set(result, tag, tensors)
        return result

    # ------------------------------------------------------------------------------------------
    def _property(self, func, prop, args):
        result = func(*args)
        self_ = args[0]
        if prop == "device.__get__":
            return DEVICE if self.tag(self_) == ON_DEVICE else result
        if prop in ("grad.__get__", "data.__get__") and isinstance(result, torch.Tensor):
            tag = self.tag(self_)
            if tag is not None:
                self.tags[result] = tag
        elif prop == "data.__set__" and self.tag(args[1]) is not None:
            self.tags[self_] = self.tag(args[1])
        return result

    def _to(self, func, args, kwargs):
        source, rest = args[0], args[1:]
        other = next((a for a in rest if isinstance(a, torch.Tensor)), kwargs.get("other"))
        if isinstance(other, torch.Tensor):  # .to(other): other's device (untagged: unknown)
            tag = self.tag(other)
        else:
            device = torch._C._nn._parse_to(*rest, **kwargs)[0]
            tag = _target(device) if device is not None else None
        result = func(*args, **kwargs)
        if tag is None:  # a dtype change: same device
            self._set(result, self.tag(source), [source])
            return result
        return self._placed(result, source, tag)

    def _index(self, func, args, kwargs):
        source, index = args[0], args[1]
        indices = [t for t in tree_leaves(index) if isinstance(t, torch.Tensor)]
        on = self.tag(source)
        if on == ON_HOST and any(self.tag(t) == ON_DEVICE and t.dim() > 0 for t in indices):
            self._fail(func, "a host tensor indexed with indices on the model's device")
        result = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:
            tags = {self.tag(t) for t in indices}
            derived = ON_DEVICE if ON_DEVICE in tags else ON_HOST if ON_HOST in tags else None
            self._set(result, on or derived, [source])
        return result
