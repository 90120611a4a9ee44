"""Training hooks of drcl2."""

from detectron2.engine import HookBase

from ..data.rebalance import RebalanceSchedule

__all__ = ["RebalanceLambdaHook"]


class RebalanceLambdaHook(HookBase):
    """
    Puts the dynamic-rebalancing progress λ of the current iteration into the
    :class:`EventStorage` each step (scalar ``drb/lambda``), so it shows in ``metrics.json`` and
    TensorBoard next to the losses.

    λ is computed from the same schedule as the sampler's (``lam(iteration / max_iter)``), in the
    main process: the sampler itself runs inside the DataLoader workers.
    """

    def __init__(self, schedule: RebalanceSchedule, max_iter: int, name: str = "drb/lambda"):
        """
        Args:
            schedule: anything with ``lam(progress)``, e.g. :class:`RebalanceSchedule`.
            max_iter (int): length of the schedule (``SOLVER.MAX_ITER``).
            name (str): name of the scalar.
        """
        self._schedule = schedule
        self._max_iter = max(int(max_iter), 1)
        self._name = name

    @classmethod
    def from_config(cls, cfg):
        drb = cfg.DATALOADER.DRCL2
        return cls(RebalanceSchedule(drb.START, drb.END, drb.MODE), cfg.SOLVER.MAX_ITER)

    def lam_at(self, iteration: int) -> float:
        return float(self._schedule.lam(min(iteration / self._max_iter, 1.0)))

    def before_step(self):
        # before_step: the storage's iteration is already the current one, and every writer hook
        # (after_step) sees the value of this step whatever the hook order.
        self.trainer.storage.put_scalar(
            self._name, self.lam_at(self.trainer.iter), smoothing_hint=False
        )
