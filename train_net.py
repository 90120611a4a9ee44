#!/usr/bin/env python
"""
Train and evaluate with drcl2: 2DRCL pre-training and ordinary detectron2 fine-tuning / evaluation.

    python train_net.py --config-file configs/pretrain_2drcl.yaml --num-gpus 8
    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml --num-gpus 8 \
        MODEL.WEIGHTS output/pretrain_2drcl/model_final_finetune.pth
    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x.yaml --eval-only \
        MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --dataset my_train /data/my/train.json /data/my/images \
        --config-file configs/toy/mask_rcnn_finetune.yaml DATASETS.TRAIN "('my_train',)" ...

All of detectron2's launcher flags work (--num-gpus, --num-machines, --machine-rank, --dist-url,
--resume, --eval-only). ``--dataset NAME JSON IMAGE_ROOT`` (repeatable) registers an LVIS-format
json before the config is read. The start-up checks (datasets registered, class counts, the
method's keys) run before anything is written to OUTPUT_DIR; ``config.yaml`` is written once the
run has been accepted.
"""

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, launch

import drcl2  # noqa: F401  (registers drcl2's datasets and models)
from drcl2 import Trainer
from drcl2.config import load_config
from drcl2.data import register_lvis_format
from drcl2.engine import check_config, default_setup, save_config, setup_drcl2_logger


def argument_parser():
    """detectron2's launcher flags, and ``--dataset NAME JSON IMAGE_ROOT``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register an LVIS-format json as dataset NAME (its images under IMAGE_ROOT) before "
        "the config is read; repeat for each split",
    )
    return parser


def register_dataset(name, json_file, image_root):
    """``--dataset``: register an LVIS-format json (again in one process: the same files only)."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file", None), meta.get("image_root", None)) == (json_file, image_root):
            return
        raise ValueError(
            f"--dataset {name}: a dataset of that name is already registered "
            f"({meta.get('json_file', 'not from a json')}); choose another name."
        )
    register_lvis_format(name, json_file, image_root)


def setup(args):
    """
    The frozen config of ``args`` (detectron2's defaults, drcl2's keys, the file, the overrides),
    checked before anything is written, and the loggers.
    """
    for name, json_file, image_root in getattr(args, "dataset", None) or ():
        register_dataset(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    check_config(cfg, training=not args.eval_only)
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
        save_config(cfg)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)  # the dataset checks: a refused start leaves OUTPUT_DIR as it was
    trainer.resume_or_load(resume=args.resume)
    save_config(cfg)
    return trainer.train()


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
