"""`train_net.py --eval-only` on the demo set writes the per-class report (CSV and PNG)."""

import csv
import math
import os

from conftest import REPO_ROOT
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

import train_net


def test_eval_only_writes_per_class_report(tmp_path, toy_val_mini):
    """A freshly initialised R-18 Mask R-CNN (MODEL.WEIGHTS "") on demo val images: poor but
    real."""
    name = toy_val_mini
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO_ROOT, "configs", "toy", "mask_rcnn_finetune.yaml"),
            "--eval-only",
            "DATASETS.TEST",
            f"('{name}',)",
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            "cpu",
            "DATALOADER.NUM_WORKERS",
            "0",
            # An untrained head scores every class about equally: keep inference cheap on 2 cores.
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "50",
            "TEST.DETECTIONS_PER_IMAGE",
            "20",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    results = train_net.main(args)
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {
            "AP",
            "AP50",
            "AP75",
            "APs",
            "APm",
            "APl",
            "APr",
            "APc",
            "APf",
        }
        assert all(not math.isnan(v) for v in results[task].values())

    inference = tmp_path / "inference"
    with open(inference / "per_class_ap.csv") as f:
        rows = list(csv.DictReader(f))
    metadata = MetadataCatalog.get(name)
    assert [r["class"] for r in rows] == list(metadata.thing_classes)
    assert [r["frequency_group"] for r in rows] == list(metadata.class_frequency)
    counts = {c["id"]: c["image_count"] for c in metadata.class_image_count}
    id_map = metadata.thing_dataset_id_to_contiguous_id
    by_contiguous = {k: counts[d] for d, k in id_map.items()}
    assert [int(r["train_image_count"]) for r in rows] == [
        by_contiguous[k] for k in range(len(rows))
    ]
    # AP is a percentage for the classes with instances in these images, undefined for the others.
    contiguous_with_gt = {
        a["category_id"] for d in DatasetCatalog.get(name) for a in d["annotations"]
    }
    for k, r in enumerate(rows):
        for column in ("ap_box", "ap_mask"):
            if k in contiguous_with_gt:
                assert 0.0 <= float(r[column]) <= 100.0
            else:
                assert r[column] == ""
    png = (inference / "per_class_ap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
