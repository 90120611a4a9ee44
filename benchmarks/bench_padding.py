"""Padding of the two views' batches under each aspect-ratio grouping rule (no pixels are decoded).

    python benchmarks/benchmark.py padding [--config-file configs/pretrain_2drcl.yaml] [--images
    20000] [--opts KEY VALUE ...]

Draws each view's size as TwoViewDatasetMapper does (its geometric augmentations of the config,
applied to image shapes only) for generated COCO/LVIS-like originals (640 px long side, 2/3
landscape), batches the images per GPU with each rule, and prints how many padded pixels the
batch's one ImageList of all views holds beyond the views' own (detectron2 pads to the largest
height and width, rounded up to 32): the cost that grouping saves.

    none        one bucket
    original    detectron2's rule: the original image's orientation
    views       drcl2's rule (orientation_bucket): both views landscape, both portrait, or mixed
                (view 1 landscape and view 2 portrait, or the other way round)
"""

import math

import numpy as np

__all__ = ["add_arguments", "run", "padding_table"]


def add_arguments(parser):
    parser.add_argument(
        "--config-file", default="configs/pretrain_2drcl.yaml", help="DRCL2 config (its views)"
    )
    parser.add_argument("--images", type=int, default=20000, help="images drawn")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4], help="images per GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides"
    )


def _view_shapes(mapper, h, w):
    """(h, w) of the two views of an h x w image: the mapper's geometric draws (shapes only)."""
    from detectron2.data import transforms as T

    from drcl2.data.view_ops import draw_geometric

    shapes = []
    for augs in mapper.geometric:
        vh, vw = h, w
        for t in draw_geometric(augs, (h, w, 3)).transforms:
            if isinstance(t, T.CropTransform):
                vh, vw = t.h, t.w
            elif isinstance(t, T.ResizeTransform):
                vh, vw = t.new_h, t.new_w
        shapes.append((vh, vw))
    return shapes


RULES = ("none", "original", "views")


def padding_table(cfg, num_images: int, batch_sizes, seed: int = 0):
    """
    ``{batch size: {rule: padded pixels beyond the views' own, in % of them}}`` for
    ``num_images`` generated originals and the views ``cfg``'s mapper draws for them.
    """
    from drcl2.data.resumable_loader import orientation_bucket
    from drcl2.data.two_view_mapper import TwoViewDatasetMapper

    mapper = TwoViewDatasetMapper(cfg, is_train=True)
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # the augmentations draw from numpy's global generator
    images = []
    for _ in range(num_images):
        short = int(rng.choice([480, 427, 426, 424, 512, 360]))
        h, w = (short, 640) if rng.random() < 2 / 3 else (640, short)
        images.append(((h, w), _view_shapes(mapper, h, w)))

    def shape_only(h, w):
        return np.broadcast_to(np.zeros(1, np.uint8), (3, h, w))

    rules = {
        "none": lambda im: 0,
        "original": lambda im: orientation_bucket({"height": im[0][0], "width": im[0][1]}),
        "views": lambda im: orientation_bucket(
            {f"view{k + 1}": {"image": shape_only(*s)} for k, s in enumerate(im[1])}
        ),
    }
    table = {}
    for batch_size in batch_sizes:
        for name, key in rules.items():
            buckets, padded, real = {}, 0, 0
            for im in images:
                bucket = buckets.setdefault(key(im), [])
                bucket.append(im)
                if len(bucket) == batch_size:
                    views = [v for _, vs in bucket for v in vs]
                    height = math.ceil(max(h for h, _ in views) / 32) * 32
                    width = math.ceil(max(w for _, w in views) / 32) * 32
                    padded += height * width * len(views)
                    real += sum(h * w for h, w in views)
                    bucket.clear()
            table.setdefault(batch_size, {})[name] = 100 * (padded / real - 1)
    return table


def run(args):
    from drcl2.config import load_config

    cfg = load_config(args.config_file, args.opts)
    table = padding_table(cfg, args.images, args.batch_sizes, args.seed)
    overrides = f" with {' '.join(args.opts)}" if args.opts else ""
    print(
        f"{args.images} generated images, views of {args.config_file}{overrides}; padding of a "
        "batch's ImageList over its views' own pixels:"
    )
    print(f"{'images/GPU':>10} " + " ".join(f"{name:>10}" for name in RULES))
    for batch_size, row in table.items():
        print(f"{batch_size:>10} " + " ".join(f"{row[name]:9.1f}%" for name in RULES))
