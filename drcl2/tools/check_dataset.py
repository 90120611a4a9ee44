"""
Check a dataset before training on it: the check drcl2's Trainer runs at start, as a command.

    python -m drcl2.tools.check_dataset lvis_v1_toy_train               # a registered dataset
    python -m drcl2.tools.check_dataset /data/my/annotations/train.json --image-root /data/my/images
    python -m drcl2.tools.check_dataset my.json --image-root DIR --images   # decode every image
    python -m drcl2.tools.check_dataset my.json --image-root DIR --all      # name every case

Errors (exit status 1): missing image files, category ids not in the json's ``categories`` (or
outside a registered dataset's classes), malformed boxes and, with ``--images``, images that cannot
be decoded (truncated, not an image) or whose decoded size differs from the json. Warnings (exit
status 0): boxes of zero area, with a negative side, or outside the image, which training drops as
detectron2 does, and boxes clipped to the image. Each is counted, with its first 5 cases named
(every one with ``--all``); see ``drcl2.data.dataset_check``. A json is read as LVIS format
(``drcl2.data.load_lvis_format_json``); registered names are the datasets that ``import drcl2``
registers (detectron2's, drcl2's).
"""

import argparse
import os
import sys

from detectron2.data import DatasetCatalog, MetadataCatalog


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.check_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dataset", metavar="NAME_OR_JSON", help="a registered dataset name, or an LVIS-format json"
    )
    parser.add_argument(
        "--image-root", help="for a json: the folder its images' file_name are relative to"
    )
    parser.add_argument(
        "--images", action="store_true", help="also decode every image (reads the whole dataset)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="name every case of each finding (default: the first 5, and how many more)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that decode images with --images (default: one per CPU core)",
    )
    args = parser.parse_args(argv)

    import drcl2  # noqa: F401  registers drcl2's datasets (and, through detectron2, its builtin ones)
    from drcl2.data.dataset_check import NAMED_CASES, check_dataset_dicts
    from drcl2.data.datasets import check_dataset_files
    from drcl2.data.lvis_format import load_lvis_format_json, read_lvis_format_json

    try:
        if args.dataset in DatasetCatalog.list():
            check_dataset_files([args.dataset])
            dicts = DatasetCatalog.get(args.dataset)
            classes = MetadataCatalog.get(args.dataset).get("thing_classes", None)
            source = f"dataset '{args.dataset}'"
        elif os.path.isfile(args.dataset):
            if not args.image_root:
                parser.error(
                    f"{args.dataset} is a json: give --image-root, the folder its images' "
                    "file_name are relative to"
                )
            if not os.path.isdir(args.image_root):
                raise FileNotFoundError(f"--image-root '{args.image_root}' is not a folder.")
            lvis_dict = read_lvis_format_json(args.dataset)  # refuses unknown category ids, counted
            dicts = load_lvis_format_json(args.dataset, args.image_root, lvis_dict=lvis_dict)
            classes = lvis_dict["categories"]
            source = args.dataset
        else:
            parser.error(
                f"'{args.dataset}' is neither a registered dataset nor a file (registered: "
                f"{', '.join(sorted(DatasetCatalog.list())[:20])}, ...)"
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = check_dataset_dicts(
        dicts,
        source=source,
        num_classes=len(classes) if classes is not None else None,
        decode_images=args.images,
        num_workers=args.num_workers,
    )
    print(report.summary(limit=None if args.all else NAMED_CASES))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
