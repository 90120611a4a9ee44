"""Training hooks of drcl2."""

import logging
import time
from typing import Callable, List, Sequence

import torch
from detectron2.engine import HookBase
from detectron2.modeling.poolers import ROIPooler
from detectron2.utils import comm

from ..data.rebalance import RebalanceSchedule
from ..utils.seeding import STEP_STREAM, derived_seed, seed_global_random_state

__all__ = [
    "RebalanceLambdaHook",
    "StepSeedHook",
    "LoaderStateHook",
    "HealthProbeHook",
    "TwoViewVisHook",
]

logger = logging.getLogger(__name__)


class RebalanceLambdaHook(HookBase):
    """
    Puts the run's λ of dynamic rebalancing for the current iteration into the
    :class:`EventStorage` each step (scalar ``drb/lambda``), so it shows in ``metrics.json`` and
    TensorBoard next to the losses. It reads the run's one :class:`RebalanceSchedule`, the one the
    sampler (images) and the model (class weights) use: the logged λ is theirs.
    """

    def __init__(self, schedule: RebalanceSchedule, name: str = "drb/lambda"):
        """
        Args:
            schedule: the run's schedule (:meth:`RebalanceSchedule.at` gives an iteration's λ).
            name (str): name of the scalar.
        """
        self._schedule, self._name = schedule, name

    def lam_at(self, iteration: int) -> float:
        return self._schedule.at(iteration)

    def before_step(self):
        # before_step: the storage's iteration is already the current one, and every writer hook
        # (after_step) sees the value of this step whatever the hook order.
        self.trainer.storage.put_scalar(
            self._name, self.lam_at(self.trainer.iter), smoothing_hint=False
        )


class StepSeedHook(HookBase):
    """
    Seeds python's, numpy's and torch's global random state before each step from
    ``(seed, iteration, rank)``, so the step's own random numbers (detectron2's RPN / ROI
    sampling, anything drawn from the global generators) are the same in a resumed run as in
    the uninterrupted one. (The images' augmentations are seeded per image by the data loader.)
    """

    def __init__(self, seed: Callable[[], int]):
        """
        Args:
            seed: returns the run's seed (read each step: a resumed run may restore it).
        """
        self._seed = seed

    def before_step(self):
        seed = derived_seed(self._seed(), STEP_STREAM, comm.get_rank(), self.trainer.iter)
        seed_global_random_state(seed)


class LoaderStateHook(HookBase):
    """
    Puts the run's seed and every process's data loader state (:class:`ResumableTrainLoader`) into
    the trainer's checkpoints, and hands them back on resume (:attr:`loaded`).

    Checkpoints are written by the main process alone, so at each iteration the checkpointer saves
    (every ``period`` iterations and the last one) the states are gathered from all processes in
    ``after_step``; this hook must come before the checkpointer. With one process the live state
    is saved, whatever iteration a checkpoint is written at.
    """

    def __init__(self, seed: Callable[[], int], period: int, max_iter: int):
        self._seed = seed
        self._period = int(period)
        self._max_iter = int(max_iter)
        self._gathered = None  # (iteration, [state of each rank])
        self.loaded = None  # what a checkpoint gave back: {"seed", "ranks"}

    def _loader_state(self):
        loader = self.trainer._trainer.data_loader
        return loader.state_dict() if hasattr(loader, "state_dict") else None

    def after_step(self):
        if comm.get_world_size() == 1:
            return
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it >= self._max_iter - 1:
            self._gathered = (it, comm.all_gather(self._loader_state()))

    def state_dict(self):
        if comm.get_world_size() == 1:
            ranks = [self._loader_state()]
        elif self._gathered is not None and self._gathered[0] == self.trainer.iter:
            ranks = self._gathered[1]
        else:
            logger.warning(
                f"Checkpoint at iteration {self.trainer.iter}: the data loader states of the other "
                "processes were not gathered (not a SOLVER.CHECKPOINT_PERIOD iteration); a resume "
                "from it restarts the aspect-ratio buckets."
            )
            ranks = None
        return {"seed": int(self._seed()), "ranks": ranks}

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)


class HealthProbeHook(HookBase):
    """
    Watches the representation while it trains (``TEST.HEALTH.PERIOD``): before the first
    iteration and every ``period`` iterations, on a fixed held-out set of images, the main process
    pools the ground-truth boxes from the model's online ``backbone`` (and ``roi_heads.box_head``
    when the model has one) and puts into the :class:`EventStorage` (TensorBoard, ``metrics.json``):

    * ``health/probe_roi``, ``health/probe_box``: class-balanced accuracy of a linear probe trained
      on the boxes of the set's even images and scored on its odd ones (RoI features / box-head
      embeddings; chance 1 / classes);
    * ``health/rank_roi``, ``health/rank_box``, ``health/rank_<level>``: RankMe effective ranks;
    * ``health/std_box``, ``health/box_norm``: collapse check and box-head output norm.

    A falling rank or a probe sinking to chance is collapse, seen while it happens
    (:mod:`drcl2.evaluation.health`; ``python -m drcl2.tools.probe`` measures exported weights). It
    draws no random numbers from the global generators, so the run's losses are the same with
    the hook on or off, and a resumed run stays exact.
    """

    def __init__(
        self,
        period: int,
        dataset_dicts: List[dict],
        *,
        num_classes: int,
        in_features: Sequence[str],
        pooler_resolution: int,
        pooler_sampling_ratio: int,
        pooler_type: str,
        min_size: int,
        max_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        image_format: str,
    ):
        self._period = int(period)
        self._dicts = dataset_dicts
        self._num_classes = num_classes
        self._in_features = list(in_features)
        self._pooler_args = (pooler_resolution, pooler_sampling_ratio, pooler_type)
        self._extract_args = dict(
            min_size=min_size,
            max_size=max_size,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            image_format=image_format,
        )

    @classmethod
    def from_config(cls, cfg):
        from detectron2.data import DatasetCatalog

        h = cfg.TEST.HEALTH
        if not h.DATASET:
            raise ValueError(
                f"TEST.HEALTH.PERIOD = {h.PERIOD} needs TEST.HEALTH.DATASET: a "
                "registered held-out dataset with box annotations (e.g. the val split), or set "
                "PERIOD 0."
            )
        if h.MAX_IMAGES < 4:
            raise ValueError(
                f"TEST.HEALTH.MAX_IMAGES = {h.MAX_IMAGES}: the probe needs at least 4 images."
            )
        return cls(
            h.PERIOD,
            DatasetCatalog.get(h.DATASET)[: h.MAX_IMAGES],
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            in_features=cfg.MODEL.ROI_HEADS.IN_FEATURES,
            pooler_resolution=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            pooler_sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            image_format=cfg.INPUT.FORMAT,
        )

    def measure(self, model) -> dict:
        """The health figures of ``model`` (a DRCL2 model or a detectron2 R-CNN) on the set."""
        from ..evaluation.health import extract_box_features, feature_health

        roi_heads = getattr(model, "roi_heads", None)
        pooler = getattr(roi_heads, "box_pooler", None)
        if (
            pooler is None
        ):  # e.g. DRCL2 without a box head: pool with a parameter-free pooler of the config
            strides = {k: v.stride for k, v in model.backbone.output_shape().items()}
            resolution, ratio, kind = self._pooler_args
            pooler = ROIPooler(
                (resolution, resolution),
                tuple(1.0 / strides[f] for f in self._in_features),
                ratio,
                kind,
            )
        features = extract_box_features(
            model.backbone,
            pooler,
            getattr(roi_heads, "box_head", None),
            self._in_features,
            self._dicts,
            **self._extract_args,
        )
        even = features.images % 2 == 0
        figures = feature_health(features.subset(even), features.subset(~even), self._num_classes)
        names = {
            "probe_roi_balanced": "probe_roi",
            "probe_box_balanced": "probe_box",
            "rank_roi": "rank_roi",
            "rank_box": "rank_box",
            "std_box": "std_box",
            "box_norm": "box_norm",
        }
        out = {f"health/{short}": figures[key] for key, short in names.items()}
        out.update({f"health/{k}": v for k, v in figures.items() if k.startswith("rank_p")})
        return {k: v for k, v in out.items() if v == v}  # NaN: not measured (no box head)

    def _log(self):
        from .pretrain_hooks import unwrap_model

        start = time.perf_counter()
        with torch.no_grad():
            figures = self.measure(unwrap_model(self.trainer.model))
        self.trainer.storage.put_scalars(**figures, smoothing_hint=False)
        logger.info(
            f"health at iteration {self.trainer.iter}: "
            + ", ".join(f"{k[len('health/') :]} {v:.3g}" for k, v in figures.items())
            + f" ({time.perf_counter() - start:.1f} s)"
        )

    def before_train(self):
        if self.trainer.iter == self.trainer.start_iter == 0 and comm.is_main_process():
            self._log()

    def after_step(self):
        if (self.trainer.iter + 1) % self._period == 0 and comm.is_main_process():
            self._log()


class TwoViewVisHook(HookBase):
    """
    Every ``period`` iterations (``VIS_PERIOD``; iterations 0, period, 2 period, ... as detectron2's
    ``GeneralizedRCNN`` draws its proposals), puts the views picture of the first image of the
    step's batch into the :class:`EventStorage` as image ``name`` (TensorBoard): view 1 with the
    masked patches and view 2 side by side, with the pairs' boxes
    (:func:`~drcl2.utils.visualize.draw_two_views`) and the draws of that very step
    (:meth:`DRCL2.draws`).

    The batch is taken from the DRCL2 model's input (a forward pre-hook) on the main process. The
    hook draws no random numbers from the global generators, so the run's losses (and exact resume)
    are the same with it on or off.
    """

    def __init__(self, period: int, *, image_format: str, metadata=None, name: str = "drcl2/views"):
        """
        Args:
            period (int): iterations between pictures (> 0).
            image_format (str): ``INPUT.FORMAT`` of the views.
            metadata: the training set's metadata (class names), or None.
            name (str): the image's name in the storage.
        """
        self._period = int(period)
        self._image_format = image_format
        self._metadata = metadata
        self._name = name
        self._batch = None
        self._handle = None

    @classmethod
    def from_config(cls, cfg):
        from detectron2.data import MetadataCatalog

        names = cfg.DATASETS.TRAIN
        return cls(
            cfg.VIS_PERIOD,
            image_format=cfg.INPUT.FORMAT,
            metadata=MetadataCatalog.get(names[0]) if names else None,
        )

    def _capture(self, module, args):
        if module.training and self.trainer.iter % self._period == 0 and args:
            self._batch = args[0]

    def before_train(self):
        from .pretrain_hooks import unwrap_model

        self._handle = unwrap_model(self.trainer.model).register_forward_pre_hook(self._capture)

    def after_step(self):
        batch, self._batch = self._batch, None
        if not batch:
            return
        from ..utils.visualize import views_pictures
        from .pretrain_hooks import unwrap_model

        (picture,) = views_pictures(
            unwrap_model(self.trainer.model),
            batch,
            self.trainer.iter,
            image_format=self._image_format,
            metadata=self._metadata,
            num_images=1,
        )
        self.trainer.storage.put_image(self._name, torch.from_numpy(picture).permute(2, 0, 1))

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
