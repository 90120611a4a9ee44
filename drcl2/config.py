"""drcl2's config keys. Call :func:`add_drcl2_config` on a detectron2 config before merging a
file, or :func:`load_config` for both."""

from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_drcl2_config", "load_config"]


def load_config(config_file: str, opts: Sequence = ()) -> CN:
    """
    detectron2's defaults with drcl2's keys, then ``config_file`` (its ``_BASE_`` chain), then the
    ``KEY VALUE`` overrides ``opts``. Not frozen: callers that keep it freeze it.
    """
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def add_drcl2_config(cfg):
    """Add drcl2's keys (with their defaults) to a detectron2 ``cfg``, in place."""
    # ---------------------------------------------------------------------------------------------
    # Dynamic rebalancing sampler (docs/method.md, DRB). Used when
    # DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler" (for DRCL2 pre-training,
    # exactly when MODEL.DRCL2.DRB.ENABLED is True: the two halves of DRB are switched together).
    # ---------------------------------------------------------------------------------------------
    cfg.DATALOADER.DRCL2 = CN()
    # Repeat-factor threshold t of LVIS repeat-factor sampling (fraction of images).
    cfg.DATALOADER.DRCL2.REPEAT_THRESHOLD = 0.001
    # Fraction of the schedule (SOLVER.MAX_ITER) at which lambda starts rising from 0.
    cfg.DATALOADER.DRCL2.START = 0.0
    # Fraction of the schedule at which lambda reaches 1 (image-level -> instance-level done).
    cfg.DATALOADER.DRCL2.END = 1.0
    # Shape of the rise of lambda between START and END: "linear" or "cosine".
    cfg.DATALOADER.DRCL2.MODE = "linear"
    # The sampler re-takes lambda from the schedule every this many iterations (and re-draws the
    # rest of the current pass with it): 10 gives a 200-iteration schedule 20 values of lambda.
    cfg.DATALOADER.DRCL2.CHUNK_ITERS = 10

    # ---------------------------------------------------------------------------------------------
    # 2DRCL pre-training model (docs/method.md), MODEL.META_ARCHITECTURE == "DRCL2". The box pooler
    # and
    # box head follow MODEL.ROI_HEADS / MODEL.ROI_BOX_HEAD, the RPN MODEL.RPN, as in fine-tuning.
    # ---------------------------------------------------------------------------------------------
    cfg.MODEL.DRCL2 = CN()
    # Base momentum m0 of the EMA target network; m rises to 1 by a cosine over SOLVER.MAX_ITER.
    cfg.MODEL.DRCL2.BASE_MOMENTUM = 0.99
    # Also train the swapped pair (online x2 vs target x1) for HCL and LCL (doubles online cost).
    cfg.MODEL.DRCL2.SYMMETRIC = False
    # Hidden width of every projector / predictor MLP (Linear-BN-ReLU-Linear).
    cfg.MODEL.DRCL2.MLP_HIDDEN_DIM = 256
    # Output width of every projector / predictor MLP.
    cfg.MODEL.DRCL2.MLP_OUT_DIM = 256
    # Norm in the MLPs and SR predictors (detectron2 get_norm name); naiveSyncBN_N syncs over ranks.
    cfg.MODEL.DRCL2.HEAD_NORM = "naiveSyncBN_N"
    cfg.MODEL.DRCL2.HCL = CN()
    # Holistic contrastive learning (image level) on/off.
    cfg.MODEL.DRCL2.HCL.ENABLED = True
    # HCL loss: "byol" (2 - 2 cos) or "infonce" (over the all-gathered batch).
    cfg.MODEL.DRCL2.HCL.LOSS = "byol"
    # Temperature of the InfoNCE option.
    cfg.MODEL.DRCL2.HCL.TEMPERATURE = 0.2
    # "infonce" only: also contrast against the target image vectors of the last QUEUE_SIZE images
    # (a MoCo queue, first in, first out), so that the negatives do not depend on the batch size
    # (0: the global batch's alone).
    cfg.MODEL.DRCL2.HCL.QUEUE_SIZE = 0
    # FPN levels averaged (after padding-aware global average pooling) into the image vector h.
    cfg.MODEL.DRCL2.HCL.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Weight w_hcl of L_HCL in the total loss.
    cfg.MODEL.DRCL2.HCL.WEIGHT = 1.0
    cfg.MODEL.DRCL2.LCL = CN()
    # Local (RoIAlign-based, object-level) contrastive learning on/off.
    cfg.MODEL.DRCL2.LCL.ENABLED = True
    # K: instances drawn per image for LCL (and box-guided masking).
    cfg.MODEL.DRCL2.LCL.NUM_INSTANCES = 8
    # Temperature tau_l of the balanced supervised-contrastive term.
    cfg.MODEL.DRCL2.LCL.TEMPERATURE = 0.2
    # Supervised (class) term L_sup on/off; off leaves only the instance term.
    cfg.MODEL.DRCL2.LCL.SUPERVISED = True
    # Keep the last this many target embeddings of every class and use them as L_sup's keys besides
    # the batch's, so that an instance has positives when its class appears once in a batch
    # (2DRCL v1: 0, no memory; L_sup then degenerated to instance discrimination at small batches).
    cfg.MODEL.DRCL2.LCL.MEMORY_PER_CLASS = 16
    # The instance term L_inst: "byol" (2 - 2 cos to the target embedding of the same instance) or
    # "infonce" (against the target embeddings of every instance of the global batch; AlignDet's).
    cfg.MODEL.DRCL2.LCL.LOSS = "byol"
    # Temperature of the "infonce" instance term (AlignDet: 0.5).
    cfg.MODEL.DRCL2.LCL.INST_TEMPERATURE = 0.5
    # "infonce" only: the instance term also contrasts against the target embeddings of the last
    # QUEUE_SIZE drawn instances (a MoCo queue; 0: the global batch's alone).
    cfg.MODEL.DRCL2.LCL.QUEUE_SIZE = 0
    # Factor on the gradient LCL sends into the backbone and FPN, in [0, 1] (0: LCL trains only the
    # box head and its MLPs, as AlignDet's box-domain pre-training on a frozen backbone).
    cfg.MODEL.DRCL2.LCL.BACKBONE_GRAD = 1.0
    # beta: weight of L_sup relative to the instance term.
    cfg.MODEL.DRCL2.LCL.SUP_WEIGHT = 0.5
    # Weight w_lcl of L_LCL (both terms) in the total loss.
    cfg.MODEL.DRCL2.LCL.WEIGHT = 1.0
    # LCL's boxes (also those of box-guided masking): "gt" (annotated boxes with their classes;
    # [ours], the default) or "proposals" (the paper's: a class-agnostic detector's proposals, read
    # from DATASETS.PROPOSAL_FILES_TRAIN with MODEL.LOAD_PROPOSALS True; the RPN term keeps the
    # annotated boxes either way).
    cfg.MODEL.DRCL2.LCL.BOX_SOURCE = "gt"
    # With "proposals": the proposals of highest objectness kept per image before the views are
    # cut, from which the K instances are drawn ([ours]).
    cfg.MODEL.DRCL2.LCL.PROPOSAL_TOPK = 50
    # A proposal takes the class of the annotated box it overlaps most if IoU >= this; otherwise it
    # is unlabelled: in L_inst and masking with weight 1, left out of L_sup ([ours]).
    cfg.MODEL.DRCL2.LCL.PROPOSAL_MATCH_IOU = 0.5
    cfg.MODEL.DRCL2.DRB = CN()
    # Dynamic rebalancing of instance selection / class weights w_c(lambda) (off: uniform weights).
    # Its image half is the sampler: True requires DATALOADER.SAMPLER_TRAIN
    # "DynamicRepeatFactorTrainingSampler", False any other sampler (checked when the model is
    # built).
    cfg.MODEL.DRCL2.DRB.ENABLED = True
    # Where the class weights w_c(lambda) act inside the model (with DRB on): "instances" (which K
    # instances LCL draws), "sup" (the L_sup weights), "masking" (where box-guided masking puts
    # patches); the terms left out weigh every class 1. The image half is the sampler's.
    cfg.MODEL.DRCL2.DRB.APPLY_TO = ["instances", "sup", "masking"]
    cfg.MODEL.DRCL2.MASK = CN()
    # Side of the square patches masked in x1 (pixels); used when AR or SR is on.
    cfg.MODEL.DRCL2.MASK.PATCH_SIZE = 32
    # rho: fraction of patches masked, in [0, 1).
    cfg.MODEL.DRCL2.MASK.RATIO = 0.5
    # Fraction of the masked patches drawn inside the sampled instance boxes, in [0, 1].
    cfg.MODEL.DRCL2.MASK.BOX_GUIDED = 0.5
    # Which heads read the masked view: "reconstruction" (AR and SR; the others read view 1
    # unmasked, the online backbone runs on both in one batch) or "all" (2DRCL v1: the online
    # backbone sees only the masked view; where the masks fall then tells the RPN and LCL where the
    # objects are, a cue fine-tuning never has).
    cfg.MODEL.DRCL2.MASK.ONLINE_VIEW = "reconstruction"
    cfg.MODEL.DRCL2.AR = CN()
    # Appearance reconstruction (pixels of x1 from the masked view) on/off.
    cfg.MODEL.DRCL2.AR.ENABLED = True
    # Feature level the AR decoder reads (its stride is the pixel-shuffle factor).
    cfg.MODEL.DRCL2.AR.IN_FEATURE = "p2"
    # Channels of the AR decoder's 3x3 conv.
    cfg.MODEL.DRCL2.AR.HIDDEN_DIM = 256
    # Weight of the L1 on visible pixels relative to masked ones.
    cfg.MODEL.DRCL2.AR.VISIBLE_WEIGHT = 0.1
    # Per-channel std of the AR target (image - PIXEL_MEAN) / PIXEL_STD here (ImageNet std, BGR).
    cfg.MODEL.DRCL2.AR.PIXEL_STD = [57.375, 57.120, 58.395]
    # Weight w_ar of L_AR in the total loss.
    cfg.MODEL.DRCL2.AR.WEIGHT = 1.0
    cfg.MODEL.DRCL2.SR = CN()
    # Semantic reconstruction (target features of x1 from the masked view) on/off.
    cfg.MODEL.DRCL2.SR.ENABLED = True
    # FPN levels with an SR predictor.
    cfg.MODEL.DRCL2.SR.IN_FEATURES = ["p3", "p4", "p5"]
    # Channels of the SR predictors' hidden 1x1 conv.
    cfg.MODEL.DRCL2.SR.HIDDEN_DIM = 256
    # Weight of visible locations relative to masked ones.
    cfg.MODEL.DRCL2.SR.VISIBLE_WEIGHT = 0.1
    # Weight w_sr of L_SR in the total loss.
    cfg.MODEL.DRCL2.SR.WEIGHT = 1.0
    cfg.MODEL.DRCL2.DECOR = CN()
    # Not in the paper: penalise the correlation between FPN channels over the locations of the
    # unmasked view 1 (drcl2.modeling.decorrelation_head), against the collapse that HCL and SR
    # cause (docs/method.md, "Evidence").
    cfg.MODEL.DRCL2.DECOR.ENABLED = False
    # Levels regularised (P6 of detectron2's FPN is a max-pool of P5: nothing of its own to learn).
    cfg.MODEL.DRCL2.DECOR.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Weight w_decor of L_decor (in [0, 1]: mean squared channel correlation) in the total loss.
    cfg.MODEL.DRCL2.DECOR.WEIGHT = 1.0
    # Names of further pretext heads (registered in drcl2.modeling.DRCL2_HEAD_REGISTRY) to train
    # besides the built-in ones switched on above (HCL, LCL, AR, SR, DECOR).
    cfg.MODEL.DRCL2.EXTRA_HEADS = []
    cfg.MODEL.DRCL2.RPN = CN()
    # Class-agnostic RPN loss on the boxes of v1 (pre-trains the RPN) on/off.
    cfg.MODEL.DRCL2.RPN.ENABLED = True
    # Weight w_rpn of both RPN losses in the total loss.
    cfg.MODEL.DRCL2.RPN.WEIGHT = 1.0
    # The RPN's targets: "view" (every object visible in v1, detectron2's rule) or "pairs" (2DRCL
    # v1: only the objects that survive both views, so an object cut from v2 is a negative in v1).
    cfg.MODEL.DRCL2.RPN.TARGETS = "view"
    cfg.MODEL.DRCL2.DET = CN()
    # Supervised detection losses in pre-training (detectron2's ROI heads on v1: box classification
    # and regression, the mask head with MODEL.MASK_ON) on/off; needs the RPN term (its proposals).
    # 2DRCL v1: off.
    cfg.MODEL.DRCL2.DET.ENABLED = True
    # Weight w_det of the ROI heads' losses in the total loss.
    cfg.MODEL.DRCL2.DET.WEIGHT = 1.0

    # ---------------------------------------------------------------------------------------------
    # The two views of 2DRCL pre-training (drcl2.data.TwoViewDatasetMapper). Pairs are (v1, v2).
    # Resize and flip follow INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN / RANDOM_FLIP.
    # ---------------------------------------------------------------------------------------------
    cfg.INPUT.DRCL2 = CN()
    # Probability that each view (v1, v2) takes the random resized crop (else the whole image):
    # view 1 is the detection view, the whole image resized and flipped (2DRCL v1: (1.0, 1.0)).
    cfg.INPUT.DRCL2.CROP_PROB = (0.0, 1.0)
    # Both views take view 1's crop, resize and flip: boxes correspond exactly, only the photometric
    # augmentations differ (AlignDet's views).
    cfg.INPUT.DRCL2.SHARED_GEOMETRY = False
    # Photometric augmentation of view 1 (colour jitter, grey, blur, solarization) on/off; off makes
    # view 1 a detector's training input (resize + flip, and the crop of CROP_PROB). 2DRCL v1: on.
    cfg.INPUT.DRCL2.VIEW1_PHOTOMETRIC = False
    # Random resized crop: range of the fraction of the image area kept.
    cfg.INPUT.DRCL2.CROP_SCALE = (0.3, 1.0)
    # Random resized crop: range of the aspect ratio (w / h), sampled log-uniformly.
    cfg.INPUT.DRCL2.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # Probability of colour jitter.
    cfg.INPUT.DRCL2.COLOR_JITTER_PROB = 0.8
    # Colour jitter brightness strength.
    cfg.INPUT.DRCL2.BRIGHTNESS = 0.4
    # Colour jitter contrast strength.
    cfg.INPUT.DRCL2.CONTRAST = 0.4
    # Colour jitter saturation strength.
    cfg.INPUT.DRCL2.SATURATION = 0.2
    # Colour jitter hue strength.
    cfg.INPUT.DRCL2.HUE = 0.1
    # Probability of turning a view grey.
    cfg.INPUT.DRCL2.GRAYSCALE_PROB = 0.2
    # Probability of Gaussian blur, (v1, v2).
    cfg.INPUT.DRCL2.BLUR_PROB = (1.0, 0.1)
    # Gaussian blur kernel size (odd, pixels).
    cfg.INPUT.DRCL2.BLUR_KERNEL_SIZE = 23
    # Range of the Gaussian blur sigma.
    cfg.INPUT.DRCL2.BLUR_SIGMA = (0.1, 2.0)
    # Probability of solarization, (v1, v2).
    cfg.INPUT.DRCL2.SOLARIZE_PROB = (0.0, 0.2)
    # An instance is kept if at least this fraction of its area survives the crop of both views.
    cfg.INPUT.DRCL2.MIN_VISIBLE = 0.3
    # ... and each side of its box is at least this many pixels in both views.
    cfg.INPUT.DRCL2.MIN_SIDE = 4.0

    # ---------------------------------------------------------------------------------------------
    # One-stage fine-tuning detectors. RetinaNet is detectron2's, with its own MODEL.RETINANET keys.
    # ---------------------------------------------------------------------------------------------
    # ATSS (drcl2.modeling.atss), MODEL.META_ARCHITECTURE == "ATSS". The defaults are the ATSS
    # paper's (Zhang et al., CVPR 2020); its anchors come from MODEL.ANCHOR_GENERATOR (the paper:
    # one square anchor per location, 8 x the level's stride; configs/Base-ATSS.yaml).
    cfg.MODEL.ATSS = CN()
    # Number of foreground classes.
    cfg.MODEL.ATSS.NUM_CLASSES = 80
    # Backbone levels the head reads (P3-P7 of build_fcos_resnet_fpn_backbone).
    cfg.MODEL.ATSS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Conv-norm-ReLU layers in each head tower (classification, box).
    cfg.MODEL.ATSS.NUM_CONVS = 4
    # Norm of the tower convs (detectron2 get_norm name; the paper: GroupNorm, 32 groups).
    cfg.MODEL.ATSS.NORM = "GN"
    # Initial foreground probability of the classifier (sets its bias).
    cfg.MODEL.ATSS.PRIOR_PROB = 0.01
    # k of the adaptive training sample selection: candidates per level and GT box (x anchors per
    # location).
    cfg.MODEL.ATSS.TOPK = 9
    # Focal loss alpha.
    cfg.MODEL.ATSS.FOCAL_LOSS_ALPHA = 0.25
    # Focal loss gamma.
    cfg.MODEL.ATSS.FOCAL_LOSS_GAMMA = 2.0
    # Weights of the anchor -> box deltas (dx, dy, dw, dh).
    cfg.MODEL.ATSS.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # Weight of the (centerness-weighted) GIoU box loss.
    cfg.MODEL.ATSS.REG_LOSS_WEIGHT = 2.0
    # Inference: class probability a location needs to be a candidate (before centerness).
    cfg.MODEL.ATSS.SCORE_THRESH_TEST = 0.05
    # Inference: candidates kept per level before NMS (by probability x centerness).
    cfg.MODEL.ATSS.TOPK_CANDIDATES_TEST = 1000
    # Inference: IoU threshold of the per-class NMS.
    cfg.MODEL.ATSS.NMS_THRESH_TEST = 0.6

    # detectron2's FCOS (drcl2.modeling.fcos, a registered subclass with from_config; detectron2
    # builds it from lazy configs only), MODEL.META_ARCHITECTURE == "FCOS". Defaults: those of
    # detectron2's FCOS (detectron2/model_zoo/configs/common/models/fcos.py, in detectron2's
    # package).
    cfg.MODEL.FCOS = CN()
    # Number of foreground classes.
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    # Backbone levels the head reads (P3-P7 of build_fcos_resnet_fpn_backbone).
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Conv-norm-ReLU layers in each head tower.
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # Norm of the tower convs (detectron2 get_norm name).
    cfg.MODEL.FCOS.NORM = "GN"
    # Initial foreground probability of the classifier.
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Centre sampling: a location is positive within this many strides of the box centre.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Focal loss alpha.
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    # Focal loss gamma.
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Inference: score (sqrt(probability x centerness)) a location needs to be a candidate.
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    # Inference: candidates kept per level before NMS.
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    # Inference: IoU threshold of the per-class NMS.
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6

    # ---------------------------------------------------------------------------------------------
    # Evaluation (drcl2.evaluation).
    # ---------------------------------------------------------------------------------------------
    # The representation's health while a detector trains (drcl2.engine.hooks.HealthProbeHook:
    # linear-probe accuracy, effective ranks, collapse check, on MAX_IMAGES images of DATASET), in
    # metrics.json and TensorBoard; for DRCL2 pre-training and R-CNN runs alike.
    cfg.TEST.HEALTH = CN()
    # Every this many iterations (and before the first); 0: off.
    cfg.TEST.HEALTH.PERIOD = 0
    # The held-out dataset (registered name, with box annotations, the training set's classes).
    cfg.TEST.HEALTH.DATASET = ""
    # How many of its images (the first ones); the probe trains on the even ones, scores the odd.
    cfg.TEST.HEALTH.MAX_IMAGES = 100
    cfg.TEST.DRCL2 = CN()
    # LVIS scoring backend: "faster" (faster-coco-eval's C++ LVIS mode) or "lvis" (reference lvis
    # API).
    cfg.TEST.DRCL2.LVIS_BACKEND = "faster"

    # ---------------------------------------------------------------------------------------------
    # Dataset checks before the first step (drcl2.data.dataset_check; DATASETS.TRAIN and .TEST).
    # ---------------------------------------------------------------------------------------------
    cfg.DATASETS.DRCL2 = CN()
    # Also decode every image at start (truncated files, sizes that differ from the json), with
    # DATALOADER.NUM_WORKERS processes, in every training process: reads the whole dataset (for
    # several GPUs, run `python -m drcl2.tools.check_dataset --images` once instead). Off: files,
    # categories and boxes only.
    cfg.DATASETS.DRCL2.CHECK_IMAGES = False
