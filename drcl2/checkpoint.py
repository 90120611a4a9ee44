"""
Transfer of 2DRCL pre-training to fine-tuning: keep the online backbone, RPN and box head of a
DRCL2 checkpoint as a detectron2 checkpoint that a stock ``GeneralizedRCNN`` loads with no renaming.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, Mapping

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.utils.file_io import PathManager

__all__ = ["FINETUNE_PREFIXES", "DRCL2Checkpointer", "finetune_state_dict", "export_finetune_weights"]

logger = logging.getLogger(__name__)

FINETUNE_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.box_head.")
"""The online modules kept for fine-tuning; the target network, projectors, predictors and
decoders are dropped (METHOD.md, Transfer)."""


def finetune_state_dict(model_state: Mapping[str, torch.Tensor], source: str = "state dict") -> Dict:
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
            f"{source} is not a pre-training checkpoint: it has no 'backbone.*' entries (first keys: "
            f"{sample}). Export the model_*.pth written by a MODEL.META_ARCHITECTURE 'DRCL2' run "
            "(e.g. configs/pretrain_2drcl.yaml) or by a detectron2 detector."
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
    with PathManager.open(src, "rb") as f:
        try:
            checkpoint = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # pickle / zip errors: not a torch checkpoint at all
            raise ValueError(f"{src} is not a pre-training checkpoint (torch.load failed: {e}).") from e
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError(
            f"{src} is not a pre-training checkpoint: expected a detectron2 checkpoint dict "
            f"with a 'model' state dict, got {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, Mapping) else "")
            + "."
        )
    state = finetune_state_dict(checkpoint["model"], source=src)
    save_finetune_weights(state, dst, source=src, iteration=checkpoint.get("iteration"))
    return state


def save_finetune_weights(state: Mapping, dst: str, source: str = "", iteration=None) -> None:
    """Write ``state`` (from :func:`finetune_state_dict`) to ``dst`` as a detectron2 checkpoint."""
    dirname = os.path.dirname(dst)
    if dirname:
        PathManager.mkdirs(dirname)
    payload = {"model": state, "__author__": "drcl2", "drcl2_source": source, "drcl2_iteration": iteration}
    with PathManager.open(dst, "wb") as f:
        torch.save(payload, f)
    groups = {p: sum(k.startswith(p) for k in state) for p in FINETUNE_PREFIXES}
    logger.info(f"Wrote fine-tuning weights to {dst} ({groups}) from {source or 'memory'}.")


class DRCL2Checkpointer(DetectionCheckpointer):
    """
    A :class:`DetectionCheckpointer` for DRCL2 models. Files loaded with detectron2's name-matching
    heuristics (ImageNet ``.pkl`` from the model zoo, pycls ``.pyth``) are matched against the
    *online* network only: with the target network's ``target_network.backbone.*`` copies in the
    model, every ImageNet key would otherwise match two model keys and detectron2 refuses to load.
    The target network then starts as a copy of the loaded online weights (``DRCL2`` copies it at
    its first training step). Other checkpoints (DRCL2 ``model_*.pth``, resume) load unchanged.
    """

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            online = {k: v for k, v in self.model.state_dict().items() if not k.startswith("target_network.")}
            checkpoint["model"] = align_and_update_state_dicts(
                online, checkpoint["model"], c2_conversion=checkpoint.get("__author__", None) == "Caffe2"
            )
            checkpoint["matching_heuristics"] = False
            incompatible = super()._load_model(checkpoint)
            # The target network is expected to be absent; it is initialised from the online one.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith("target_network.")
            ]
            return incompatible
        return super()._load_model(checkpoint)
