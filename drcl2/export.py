"""
The transfer of pre-training to fine-tuning (docs/method.md, "Transfer"): the parts of a
pre-training checkpoint (2DRCL, or a detector trained as the supervised pre-training baseline) that
a stock detectron2 detector of the same backbone loads with ``MODEL.WEIGHTS``, names unchanged.

* :func:`export_finetune_weights`: the online backbone, RPN and box head (what 2DRCL and its
  baselines hand to fine-tuning);
* :func:`export_parts`: the listed parts only (e.g. the ResNet, ``backbone.bottom_up``: a source
  initialisation like ImageNet weights).
"""

import logging
import os
from collections import OrderedDict
from typing import Dict, Mapping, Sequence

import torch
from detectron2.utils.file_io import PathManager

from .checkpoint import atomic_write

__all__ = [
    "FINETUNE_PREFIXES",
    "finetune_state_dict",
    "export_finetune_weights",
    "save_finetune_weights",
    "export_parts",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

FINETUNE_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.box_head.")
"""The online modules kept for fine-tuning; the target network, projectors, predictors and
decoders are dropped (docs/method.md, "Transfer")."""


def finetune_state_dict(
    model_state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> Dict:
    """
    Args:
        model_state: the state dict of a pre-trained model: a :class:`drcl2.modeling.DRCL2`, or a
            detectron2 detector (``GeneralizedRCNN``) trained as a supervised pre-training
            baseline — both hold the fine-tuning modules under the same names.
        source: name of where it came from, for error messages.

    Returns:
        OrderedDict: the ``backbone.*``, ``proposal_generator.*`` and ``roi_heads.box_head.*``
        entries, names unchanged, tensors on the CPU.
    """
    keys = list(model_state.keys())
    if not any(k.startswith("backbone.") for k in keys):
        sample = ", ".join(keys[:5]) or "(no keys)"
        raise ValueError(
            f"{source} is not a pre-training checkpoint: it has no 'backbone.*' entries (first "
            f"keys: {sample}). Export the model_*.pth written by a MODEL.META_ARCHITECTURE 'DRCL2' "
            "run (e.g. configs/pretrain_2drcl.yaml) or by a detectron2 detector."
        )
    return OrderedDict(
        (k, v.detach().cpu() if torch.is_tensor(v) else v)
        for k, v in model_state.items()
        if k.startswith(FINETUNE_PREFIXES)
    )


def export_finetune_weights(src: str, dst: str) -> Dict:
    """
    Read a pre-training checkpoint written by detectron2's checkpointer (``{"model": state_dict,
    ...}``; a DRCL2 model or a detector, see :func:`finetune_state_dict`) and write the fine-tuning
    weights to ``dst`` as ``{"model": state_dict}`` (``.pth``), loadable
    with ``MODEL.WEIGHTS dst`` by any fine-tuning config of the same backbone.

    Args:
        src: path of the pre-training checkpoint (``OUTPUT_DIR/model_final.pth``).
        dst: path of the file to write (its folder is created).

    Returns:
        the exported state dict.
    """
    checkpoint = load_checkpoint(src)
    state = finetune_state_dict(checkpoint["model"], source=src)
    save_finetune_weights(state, dst, source=src, iteration=checkpoint.get("iteration"))
    return state


def save_finetune_weights(state: Mapping, dst: str, source: str = "", iteration=None) -> None:
    """Write ``state`` (from :func:`finetune_state_dict`) to ``dst`` as a detectron2 checkpoint."""
    dirname = os.path.dirname(dst)
    if dirname:
        PathManager.mkdirs(dirname)
    payload = {
        "model": state,
        "__author__": "drcl2",
        "drcl2_source": source,
        "drcl2_iteration": iteration,
    }
    atomic_write(dst, lambda f: torch.save(payload, f))
    groups = {p: sum(k.startswith(p) for k in state) for p in FINETUNE_PREFIXES}
    logger.info(f"Wrote fine-tuning weights to {dst} ({groups}) from {source or 'memory'}.")


def load_checkpoint(src: str) -> Dict:
    """A detectron2 checkpoint (``{"model": state_dict, ...}``) read on the CPU; ValueError naming
    the file when it is not one."""
    with PathManager.open(src, "rb") as f:
        try:
            checkpoint = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # pickle / zip errors: not a torch checkpoint at all
            raise ValueError(
                f"{src} is not a pre-training checkpoint (torch.load failed: {e})."
            ) from e
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError(
            f"{src} is not a pre-training checkpoint: expected a detectron2 checkpoint dict "
            f"with a 'model' state dict, got {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, Mapping) else "")
            + "."
        )
    return checkpoint


def export_parts(src: str, dst: str, parts: Sequence[str]) -> Dict:
    """
    Write the entries of checkpoint ``src`` under the module paths ``parts`` (e.g.
    ``["backbone.bottom_up"]``, the ResNet) to ``dst`` as a detectron2 checkpoint, atomically;
    return them. ValueError when none is there.
    """
    checkpoint = load_checkpoint(src)
    prefixes = tuple(p.rstrip(".") + "." for p in parts)
    state = OrderedDict(
        (k, v.detach().cpu() if torch.is_tensor(v) else v)
        for k, v in checkpoint["model"].items()
        if k.startswith(prefixes)
    )
    if not state:
        raise ValueError(f"{src}: no entries under {list(parts)}.")
    payload = {
        "model": state,
        "__author__": "drcl2",
        "drcl2_source": src,
        "drcl2_parts": list(parts),
    }
    atomic_write(dst, lambda f: torch.save(payload, f))
    logger.info(f"Wrote {len(state)} tensors of {list(parts)} to {dst} from {src}.")
    return state
