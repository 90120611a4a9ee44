#!/usr/bin/env python
"""
Train and evaluate with drcl2: 2DRCL pre-training and ordinary detectron2 fine-tuning / evaluation.

    python train_net.py --config-file configs/pretrain_2drcl.yaml --num-gpus 8
    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml --num-gpus 8 \
        MODEL.WEIGHTS output/pretrain_2drcl/model_final_finetune.pth
    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml --eval-only \
        MODEL.WEIGHTS /path/to/model_final.pth

All of detectron2's launcher flags work (--num-gpus, --num-machines, --machine-rank, --dist-url,
--resume, --eval-only).
"""

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch

import drcl2  # noqa: F401  (registers drcl2's datasets and models)
from drcl2 import Trainer, add_drcl2_config
from drcl2.engine import setup_drcl2_logger


def setup(args):
    """The frozen config of ``args``: detectron2's defaults, drcl2's keys, the file, the
    overrides."""
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_drcl2_logger(cfg.OUTPUT_DIR)  # drcl2's own log lines, to the console and log.txt
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
