"""drcl2's trainer: detectron2's DefaultTrainer with long-tail-aware data and evaluation choices."""

import logging
import os
import weakref

from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicDetectionCheckpointer, DRCL2Checkpointer
from ..data.datasets import check_dataset_files, check_datasets_before_training, check_test_dataset
from ..data.proposals import check_proposal_files
from ..data.rebalance import build_rebalance_schedule
from ..data.resumable_loader import ResumableTrainLoader
from ..data.samplers import DynamicRepeatFactorTrainingSampler
from ..evaluation import COCOLTEvaluator, LVISEvaluator
from .checks import check_config
from .hooks import (
    HealthProbeHook,
    LoaderStateHook,
    RebalanceLambdaHook,
    StepSeedHook,
    TwoViewVisHook,
)
from .pretrain_hooks import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "resolve_seed", "setup_drcl2_logger"]


def resolve_seed(seed: int) -> int:
    """``seed`` when >= 0, else a random seed shared by all processes (needs all ranks)."""
    return int(seed) if seed >= 0 else int(comm.shared_random_seed())


def setup_drcl2_logger(output_dir=None):
    """
    Send the ``drcl2`` logger's records (the sampler summary, "Wrote fine-tuning weights to ...",
    warnings) to the console and, given ``output_dir``, to its ``log.txt``, as detectron2's
    ``default_setup`` does for the ``detectron2`` logger (same handlers; idempotent).
    """
    return setup_logger(
        output_dir, distributed_rank=comm.get_rank(), name="drcl2", abbrev_name="drcl2"
    )


def _log_file_dir(output_dir):
    """``output_dir`` when detectron2's logger already writes a log file there (default_setup)."""
    for handler in logging.getLogger("detectron2").handlers:
        filename = getattr(getattr(handler, "stream", None), "name", "")
        if (
            isinstance(filename, str)
            and output_dir
            and os.path.abspath(filename).startswith(os.path.abspath(output_dir) + os.sep)
        ):
            return output_dir
    return None


class Trainer(DefaultTrainer):
    """
    A :class:`DefaultTrainer` that

    * evaluates LVIS-format datasets (``evaluator_type == "lvis"``) with drcl2's LVISEvaluator (AP,
      APr, APc, APf; backend ``TEST.DRCL2.LVIS_BACKEND``), COCO-LT (``"coco_lt"``) with
      COCOLTEvaluator (COCO metrics + AP1-AP4) and COCO-format ones with :class:`COCOEvaluator`;
    * accepts ``DATALOADER.SAMPLER_TRAIN: "DynamicRepeatFactorTrainingSampler"`` (drcl2's dynamic
      rebalancing sampler) besides detectron2's own samplers;
    * for 2DRCL pre-training (``MODEL.META_ARCHITECTURE: "DRCL2"``) builds the two-view loader,
      hands the training set's class statistics to the model and exports the fine-tuning weights
      at the end (the model moves its target network itself, under any trainer);
    * resumes exactly: images are augmented under random state seeded per image
      (:class:`~drcl2.data.resumable_loader.ResumableTrainLoader`), each step's random numbers are
      seeded per iteration, and checkpoints hold the seed and the data loader's state, so a run
      killed and resumed with ``--resume`` gives the batches and losses of the uninterrupted one;
    * writes checkpoints atomically (:class:`~drcl2.checkpoint.AtomicDetectionCheckpointer`),
      warns when ``--resume`` finds no checkpoint, and refuses, at start
      (:func:`~drcl2.engine.checks.check_config`), an unregistered dataset, a ``NUM_CLASSES`` that
      is not that of every dataset the run reads, or a bad rebalancing schedule.

    detectron2's ``DefaultTrainer`` does not know drcl2's sampler name ("Unknown training sampler"):
    use this Trainer, or build the sampler with :meth:`build_train_sampler` in your own trainer.

    Use it as detectron2's: ``Trainer(cfg)``, ``resume_or_load()``, ``train()``, ``Trainer.test()``.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except that the DDP wrapper comes from build_ddp_model, which
        # also works for several CPU processes (gloo).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        setup_drcl2_logger(_log_file_dir(cfg.OUTPUT_DIR))
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        # before anything is built, generated or written (train_net.py has run them already)
        check_config(cfg)
        # The run's one rebalancing schedule: the sampler, the model and the drb/lambda log all
        # take an iteration's lambda from it (None without dynamic rebalancing).
        self.rebalance_schedule = build_rebalance_schedule(cfg)
        # The seed of the data stream and of each step's random numbers; a checkpoint records it,
        # so a resumed run goes on with the same one even when SEED is -1 (drawn here).
        self.seed = resolve_seed(cfg.SEED)
        model = self.build_model(cfg)
        if hasattr(model, "seed"):
            model.seed = self.seed  # DRCL2's per-image draws (instances, masks)
        optimizer = self.build_optimizer(cfg, model)
        train_dataset = self.build_train_dataset(cfg)
        data_loader = self.build_train_loader(
            cfg, dataset=train_dataset, seed=self.seed, schedule=self.rebalance_schedule
        )
        if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            # DRB's class weights need the schedule and the training set's class statistics;
            # build_model reads neither, so they are handed over here (a resumed run then loads
            # the same statistics from its checkpoint).
            model.rebalance_schedule = self.rebalance_schedule
            model.set_class_statistics(train_dataset)
        del train_dataset  # the data loader holds its own serialized copy
        model = self.build_ddp_model(cfg, model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def run_step(self):
        """detectron2's step; a divergence raised inside the model (e.g. the RPN's "Predicted boxes
        or scores contain Inf/NaN") is re-raised with the iteration it happened at."""
        try:
            super().run_step()
        except FloatingPointError as e:
            if "iteration" in str(e):  # detectron2's own loss check names it
                raise
            raise FloatingPointError(f"iteration {self.iter}: {e}") from e

    def build_checkpointer(self, cfg, model):
        """
        detectron2's :class:`DetectionCheckpointer`; for 2DRCL pre-training a
        :class:`DRCL2Checkpointer`, which loads ImageNet / model-zoo weights into the online network
        only (the target network holds copies under the same names).
        """
        checkpointer = (
            DRCL2Checkpointer
            if cfg.MODEL.META_ARCHITECTURE == "DRCL2"
            else AtomicDetectionCheckpointer
        )
        return checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """
        Wrap ``model`` in DistributedDataParallel when there are several processes (detectron2's
        ``create_ddp_model``). DDP takes ``device_ids`` only for a GPU module: a CPU model (gloo
        backend) gets none.
        """
        device = next(model.parameters()).device
        device_ids = [comm.get_local_rank()] if device.type == "cuda" else None
        return create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)

    def resume_or_load(self, resume=True):
        """
        detectron2's resume_or_load. A resumed run (iteration k > 0) also gets back the run's seed
        and moves its data loader (built in ``__init__``, before the checkpoint was read) to the
        checkpoint's loader state: the same batches, views and step random numbers as the
        uninterrupted run. A checkpoint without loader state (or from another number of processes)
        resumes the stream at image ``k * batch`` instead, with a warning.
        """
        if resume and not self.checkpointer.has_checkpoint():
            logger.warning(
                f"--resume: no checkpoint in '{self.cfg.OUTPUT_DIR}' (no last_checkpoint file): "
                f"training starts from iteration 0 with MODEL.WEIGHTS "
                f"'{self.cfg.MODEL.WEIGHTS}'. If this run was meant to go on from an earlier one, "
                "stop it and check OUTPUT_DIR."
            )
        super().resume_or_load(resume=resume)
        if self.start_iter == 0:
            return
        saved = self._loader_state_hook.loaded or {}
        seed_restored = False
        if "seed" in saved and saved["seed"] != self.seed:
            if self.cfg.SEED >= 0:
                logger.warning(
                    f"The checkpoint was trained with seed {saved['seed']}, this run has SEED "
                    f"{self.cfg.SEED}: the resumed run is not the continuation of the interrupted "
                    "one."
                )
            else:
                self.seed, seed_restored = int(saved["seed"]), True
                model = unwrap_model(self.model)
                if hasattr(model, "seed"):
                    model.seed = self.seed  # DRCL2's per-image draws
        ranks = saved.get("ranks")
        state = ranks[comm.get_rank()] if ranks and len(ranks) == comm.get_world_size() else None
        if state is None:
            logger.warning(
                "The checkpoint holds no data loader state for this number of processes: the data "
                f"stream goes on at image {self.start_iter} x batch, and aspect-ratio buckets "
                "start empty (the batches differ from the uninterrupted run's)."
            )
        loader = self._trainer.data_loader
        if seed_restored or not hasattr(loader, "load_state_dict"):
            # the sampler and the images' seeds follow the run's seed: a new loader
            self._trainer.reset_data_loader(
                lambda: self.build_train_loader(
                    self.cfg,
                    start_iter=self.start_iter,
                    seed=self.seed,
                    state=state,
                    schedule=self.rebalance_schedule,
                )
            )
            return
        loader.load_state_dict(
            state if state is not None else loader.state_at_iteration(self.start_iter)
        )
        self._trainer.reset_data_loader(lambda: loader)  # a new iterator, from that state

    def build_hooks(self):
        ret = super().build_hooks()
        # Each step's own random numbers (RPN / ROI sampling, ...) seeded from (seed, iteration).
        ret.insert(0, StepSeedHook(lambda: self.seed))
        # The data loader's state is gathered from every process before the checkpointer saves it.
        self._loader_state_hook = LoaderStateHook(
            lambda: self.seed, self.cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter
        )
        at = next(
            (
                i
                for i, h in enumerate(ret)
                if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
            ),
            len(ret),
        )
        ret.insert(at, self._loader_state_hook)
        if self.rebalance_schedule is not None:  # logs drb/lambda each step
            ret.insert(0, RebalanceLambdaHook(self.rebalance_schedule))
        if self.cfg.TEST.HEALTH.PERIOD > 0 and comm.is_main_process():
            # before the writers, so that its figures are written at the step they are measured
            writer = next(
                (i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret)
            )
            ret.insert(writer, HealthProbeHook.from_config(self.cfg))
        if self.cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            ret = self._add_drcl2_hooks(ret)
        return ret

    def _add_drcl2_hooks(self, ret):
        """
        2DRCL pre-training: the export of ``OUTPUT_DIR/model_final_finetune.pth`` after the last
        iteration, and with ``VIS_PERIOD`` > 0 the views picture every VIS_PERIOD iterations
        (:class:`TwoViewVisHook`). (The model moves its EMA target network itself, at each new
        iteration.)
        """
        from .pretrain_hooks import ExportFinetuneWeightsHook

        cfg = self.cfg
        if cfg.VIS_PERIOD > 0 and comm.is_main_process():
            # the views picture into TensorBoard, before the writers so it goes out at its step
            writer = next(
                (i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret)
            )
            ret.insert(writer, TwoViewVisHook.from_config(cfg))
        ret.append(
            ExportFinetuneWeightsHook(
                os.path.join(cfg.OUTPUT_DIR, "model_final_finetune.pth"), cfg.SOLVER.MAX_ITER
            )
        )
        return ret

    @classmethod
    def build_train_dataset(cls, cfg):
        """
        The training dataset dicts of ``cfg.DATASETS.TRAIN``, filtered as detectron2 does; they and
        the test datasets are checked first
        (:func:`~drcl2.data.datasets.check_datasets_before_training`).
        """
        check_dataset_files(cfg.DATASETS.TRAIN)
        if cfg.MODEL.LOAD_PROPOSALS:  # fail naming the file, not with detectron2's bare KeyError
            check_proposal_files(cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON
            else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_datasets_before_training(cfg, dicts)
        return dicts

    @classmethod
    def build_train_loader(
        cls, cfg, start_iter=0, dataset=None, *, seed=None, state=None, schedule=None
    ):
        """
        A :class:`ResumableTrainLoader` (detectron2's batches and aspect-ratio grouping, with
        augmentations seeded per image and a state that checkpoints resume exactly).

        Args:
            start_iter (int): iteration the stream starts at, when there is no ``state``.
            dataset (list[dict] or None): the training dicts, if already loaded
                (default: :meth:`build_train_dataset`).
            seed (int or None): the run's seed (default ``SEED``, or a shared random one if < 0).
            state (dict or None): a :meth:`ResumableTrainLoader.state_dict` to resume from.
            schedule (RebalanceSchedule or None): the run's rebalancing schedule, for the dynamic
                sampler (default: built from ``cfg``).
        """
        if dataset is None:
            dataset = cls.build_train_dataset(cfg)
        if seed is None:
            seed = resolve_seed(cfg.SEED)
        world = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the "
                f"number of processes ({world})."
            )
        args = (
            dataset,
            cls.build_train_sampler(cfg, dataset, seed=seed, schedule=schedule),
            cls.build_train_mapper(cfg),
        )
        kwargs = dict(
            batch_size=cfg.SOLVER.IMS_PER_BATCH // world,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=seed,
            rank=comm.get_rank(),
        )
        if state is not None:
            return ResumableTrainLoader(*args, state=state, **kwargs)
        return ResumableTrainLoader.at_iteration(*args, start_iter=start_iter, **kwargs)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_test_dataset(cfg, dataset_name)  # once per process (see build_train_dataset)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_train_mapper(cls, cfg):
        """
        The per-image training mapper: detectron2's :class:`DatasetMapper`, or drcl2's
        :class:`TwoViewDatasetMapper` for 2DRCL pre-training (``MODEL.META_ARCHITECTURE: "DRCL2"``).
        """
        if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            from ..data.two_view_mapper import TwoViewDatasetMapper

            return TwoViewDatasetMapper(cfg, is_train=True)
        return DatasetMapper(cfg, is_train=True)

    @classmethod
    def build_train_sampler(cls, cfg, dataset_dicts, seed=None, schedule=None):
        """
        The training sampler of ``DATALOADER.SAMPLER_TRAIN``, seeded with ``seed`` (default
        ``SEED``): drcl2's ``DynamicRepeatFactorTrainingSampler`` (with the run's rebalancing
        ``schedule``; default: built from ``cfg``) or detectron2's own ones. The stream starts at
        its beginning; the data loader skips to where a resumed run goes on.
        """
        seed = cfg.SEED if seed is None else int(seed)
        name = cfg.DATALOADER.SAMPLER_TRAIN
        if name == "DynamicRepeatFactorTrainingSampler":
            return DynamicRepeatFactorTrainingSampler.from_config(
                cfg, dataset_dicts, seed=seed, schedule=schedule
            )
        if name == "TrainingSampler":
            return TrainingSampler(len(dataset_dicts), seed=seed)
        if name == "RepeatFactorTrainingSampler":
            factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
            )
            return RepeatFactorTrainingSampler(factors, seed=seed)
        if name == "RandomSubsetTrainingSampler":
            return RandomSubsetTrainingSampler(
                len(dataset_dicts),
                cfg.DATALOADER.RANDOM_SUBSET_RATIO,
                seed_shuffle=seed,
                seed_subset=seed,
            )
        # detectron2's other samplers (and its error for unknown names), as detectron2 builds them.
        logger.warning(
            f"{name} is built by detectron2; a resumed run repeats its stream only if it is seeded."
        )
        return _train_loader_from_config(cfg, mapper=lambda d: d, dataset=dataset_dicts)["sampler"]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:
                # one folder per dataset, so that the results of several test sets (e.g. val and
                # test) do not overwrite each other
                output_folder = os.path.join(output_folder, dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "lvis":
            return LVISEvaluator(
                dataset_name,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                backend=cfg.TEST.DRCL2.LVIS_BACKEND,
                # r/c/f groups a json lacks: training counts
                train_dataset_names=cfg.DATASETS.TRAIN,
            )
        if evaluator_type == "coco_lt":
            return COCOLTEvaluator(
                dataset_name,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            )
        if evaluator_type == "coco":
            return COCOEvaluator(
                dataset_name,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            )
        raise NotImplementedError(
            f"No evaluator for dataset '{dataset_name}' (evaluator_type={evaluator_type!r}); "
            "drcl2's Trainer evaluates 'lvis', 'coco' and 'coco_lt' datasets. Override "
            "Trainer.build_evaluator for other kinds."
        )
