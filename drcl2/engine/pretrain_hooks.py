"""
The hook of 2DRCL pre-training (``MODEL.META_ARCHITECTURE: "DRCL2"``) in drcl2's Trainer: export
the fine-tuning weights at the end. (The model moves its EMA target network itself, under any
trainer; drcl2's Trainer hands the class statistics to the model when it is built.)
"""

from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..export import finetune_state_dict, save_finetune_weights

__all__ = ["ExportFinetuneWeightsHook", "unwrap_model"]


def unwrap_model(model):
    """The module inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class ExportFinetuneWeightsHook(HookBase):
    """
    When training reaches its last iteration, write the fine-tuning weights (online
    ``backbone.*``, ``proposal_generator.*``, ``roi_heads.box_head.*``) of the model to
    ``output_path`` on the main process (see :func:`drcl2.export.export_finetune_weights`).
    """

    def __init__(self, output_path: str, max_iter: int):
        self._output_path = output_path
        self._max_iter = max_iter

    def after_train(self):
        if not comm.is_main_process() or self.trainer.iter + 1 < self._max_iter:
            return  # interrupted runs export nothing
        state = finetune_state_dict(
            unwrap_model(self.trainer.model).state_dict(), source="the trained model"
        )
        save_finetune_weights(
            state, self._output_path, source="trained model", iteration=self.trainer.iter
        )
