"""Training hooks of drcl2."""

from detectron2.engine import HookBase

from ..data.rebalance import RebalanceSchedule, chunked_lambda

__all__ = ["RebalanceLambdaHook"]


class RebalanceLambdaHook(HookBase):
    """
    Puts the λ that the dynamic rebalancing sampler used for the current iteration's images into
    the :class:`EventStorage` each step (scalar ``drb/lambda``), so it shows in ``metrics.json`` and
    TensorBoard next to the losses.

    The sampler runs inside the DataLoader workers; its λ is a pure function of the iteration
    (:func:`drcl2.data.rebalance.chunked_lambda`: the schedule's value at the start of the
    iteration's chunk), computed here from the same config, so the logged value is the sampled one.
    """

    def __init__(self, schedule: RebalanceSchedule, max_iter: int, chunk_iters: int, name: str = "drb/lambda"):
        """
        Args:
            schedule: anything with ``lam(progress)``, e.g. :class:`RebalanceSchedule`.
            max_iter (int): length of the schedule (``SOLVER.MAX_ITER``).
            chunk_iters (int): the sampler's ``DATALOADER.DRCL2.CHUNK_ITERS``.
            name (str): name of the scalar.
        """
        self._schedule = schedule
        self._max_iter = max(int(max_iter), 1)
        self._chunk_iters = int(chunk_iters)
        self._name = name

    @classmethod
    def from_config(cls, cfg):
        drb = cfg.DATALOADER.DRCL2
        return cls(RebalanceSchedule(drb.START, drb.END, drb.MODE), cfg.SOLVER.MAX_ITER, drb.CHUNK_ITERS)

    def lam_at(self, iteration: int) -> float:
        return chunked_lambda(self._schedule.lam, iteration, self._max_iter, self._chunk_iters)

    def before_step(self):
        # before_step: the storage's iteration is already the current one, and every writer hook
        # (after_step) sees the value of this step whatever the hook order.
        self.trainer.storage.put_scalar(
            self._name, self.lam_at(self.trainer.iter), smoothing_hint=False
        )
