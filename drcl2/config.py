# TEMPORARY NOTE TO CONCURRENT ENGINEERS (helpers): read /work/main/ENGINEERS-READ-FIRST.md now (git rules, shared files, deadline 19:00 UTC). Lead removes this line.
"""drcl2's config keys. Call :func:`add_drcl2_config` on a detectron2 config before merging a file."""
from detectron2.config import CfgNode as CN


def add_drcl2_config(cfg):
    """Add drcl2's keys (with their defaults) to a detectron2 ``cfg``, in place."""
    # ---------------------------------------------------------------------------------------------
    # Dynamic rebalancing sampler (METHOD.md, DRB). Used when
    # DATALOADER.SAMPLER_TRAIN == "DynamicRepeatFactorTrainingSampler".
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
