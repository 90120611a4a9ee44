"""drcl2's trainer: detectron2's DefaultTrainer with long-tail-aware data and evaluation choices."""
import logging
import os
import weakref

from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.evaluation import COCOEvaluator

from ..checkpoint import DRCL2Checkpointer
from ..data.datasets import check_dataset_files
from ..data.proposals import check_proposal_files
from ..evaluation import COCOLTEvaluator, LVISEvaluator

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


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
      at the end (the model moves its target network itself, under any trainer).

    Use it as detectron2's: ``Trainer(cfg)``, ``resume_or_load()``, ``train()``, ``Trainer.test()``.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except that the DDP wrapper comes from build_ddp_model, which
        # also works for several CPU processes (gloo).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        train_dataset = self.build_train_dataset(cfg)
        data_loader = self.build_train_loader(cfg, dataset=train_dataset)
        if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            # DRB's class weights need the training set's class statistics; build_model does not
            # read the dataset, so they are handed over here, from the dicts already loaded (a
            # resumed run then loads the same statistics from its checkpoint).
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

    def build_checkpointer(self, cfg, model):
        """
        detectron2's :class:`DetectionCheckpointer`; for 2DRCL pre-training a
        :class:`DRCL2Checkpointer`, which loads ImageNet / model-zoo weights into the online network
        only (the target network holds copies under the same names).
        """
        checkpointer = DRCL2Checkpointer if cfg.MODEL.META_ARCHITECTURE == "DRCL2" else DetectionCheckpointer
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
        detectron2's resume_or_load; in addition, a run resumed at iteration k > 0 with the dynamic
        rebalancing sampler rebuilds its data loader (built in ``__init__``, before the checkpoint
        iteration was known) with the sampler started at k, so the stream and the λ schedule go on
        where the interrupted run stopped.
        """
        super().resume_or_load(resume=resume)
        dynamic = self.cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler"
        if dynamic and self.start_iter > 0:
            self._trainer.reset_data_loader(
                lambda: self.build_train_loader(self.cfg, start_iter=self.start_iter)
            )

    def build_hooks(self):
        ret = super().build_hooks()
        if self.cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler":
            from .hooks import RebalanceLambdaHook

            ret.insert(0, RebalanceLambdaHook.from_config(self.cfg))  # logs drb/lambda each step
        if self.cfg.MODEL.META_ARCHITECTURE == "DRCL2":
            ret = self._add_drcl2_hooks(ret)
        return ret

    def _add_drcl2_hooks(self, ret):
        """
        2DRCL pre-training: the export of ``OUTPUT_DIR/model_final_finetune.pth`` after the last
        iteration. (The model moves its EMA target network itself, at each new iteration.)
        """
        from .pretrain_hooks import ExportFinetuneWeightsHook

        cfg = self.cfg
        ret.append(
            ExportFinetuneWeightsHook(
                os.path.join(cfg.OUTPUT_DIR, "model_final_finetune.pth"), cfg.SOLVER.MAX_ITER
            )
        )
        return ret

    @classmethod
    def build_train_dataset(cls, cfg):
        """The training dataset dicts of ``cfg.DATASETS.TRAIN``, filtered as detectron2 does."""
        check_dataset_files(cfg.DATASETS.TRAIN)
        if cfg.MODEL.LOAD_PROPOSALS:  # fail naming the file, not with detectron2's bare KeyError
            check_proposal_files(cfg.DATASETS.TRAIN, cfg.DATASETS.PROPOSAL_FILES_TRAIN)
        return get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON
            else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0, dataset=None):
        """
        Args:
            start_iter (int): iteration the training stream starts at (a resumed run's start), for
                samplers that keep a schedule (drcl2's dynamic rebalancing sampler).
            dataset (list[dict] or None): the training dicts, if already loaded
                (default: :meth:`build_train_dataset`).
        """
        if dataset is None:
            dataset = cls.build_train_dataset(cfg)
        return build_detection_train_loader(
            cfg,
            dataset=dataset,
            mapper=cls.build_train_mapper(cfg),
            sampler=cls.build_train_sampler(cfg, dataset, start_iter=start_iter),
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_dataset_files([dataset_name])
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
    def build_train_sampler(cls, cfg, dataset_dicts, start_iter=0):
        """
        The training sampler for drcl2's own ``DATALOADER.SAMPLER_TRAIN`` values; ``None`` lets
        detectron2 build its built-in ones (TrainingSampler, RepeatFactorTrainingSampler, ...).
        """
        if cfg.DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler":
            from ..data.samplers import DynamicRepeatFactorTrainingSampler

            return DynamicRepeatFactorTrainingSampler.from_config(
                cfg, dataset_dicts, start_iter=start_iter
            )
        return None

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
            "drcl2's Trainer evaluates 'lvis', 'coco' and 'coco_lt' datasets. Override Trainer.build_evaluator "
            "for other kinds."
        )
