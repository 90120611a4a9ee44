"""`train_net.py --eval-only` on the demo set writes the per-class report (CSV and PNG)."""
import csv
import importlib.util
import json
import math
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from drcl2.data import register_lvis_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NUM_VAL_IMAGES = 12  # of the demo val set: inference of a fresh model takes ~1 s per image here


@pytest.fixture
def toy_val_head(tmp_path):
    """The first NUM_VAL_IMAGES images of lvis_v1_toy_val (same files and categories), registered."""
    DatasetCatalog.get("lvis_v1_toy_val")  # generates the demo set if needed
    meta = MetadataCatalog.get("lvis_v1_toy_val")
    with open(meta.json_file) as f:
        val = json.load(f)
    val["images"] = val["images"][:NUM_VAL_IMAGES]
    kept = {img["id"] for img in val["images"]}
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in kept]
    json_file = tmp_path / "lvis_v1_toy_val_head.json"
    json_file.write_text(json.dumps(val))
    name = f"lvis_v1_toy_val_head_{tmp_path.name}"
    register_lvis_format(name, str(json_file), meta.image_root)
    yield name, {a["category_id"] for a in val["annotations"]}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_eval_only_writes_per_class_report(tmp_path, toy_val_head):
    """A freshly initialised R-18 Mask R-CNN (MODEL.WEIGHTS "") on demo val images: poor but real."""
    name, val_category_ids = toy_val_head
    train_net = _train_net()
    args = default_argument_parser().parse_args(
        [
            "--config-file", os.path.join(REPO, "configs", "toy", "mask_rcnn_finetune.yaml"),
            "--eval-only",
            "DATASETS.TEST", f"('{name}',)",
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", "0",
            # An untrained head scores every class about equally: keep inference cheap on 2 cores.
            "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
            "TEST.DETECTIONS_PER_IMAGE", "20",
            "OUTPUT_DIR", str(tmp_path),
        ]
    )
    results = train_net.main(args)
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}
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
    assert [int(r["train_image_count"]) for r in rows] == [by_contiguous[k] for k in range(len(rows))]
    # AP is a percentage for the classes with instances in these images, undefined for the others.
    contiguous_with_gt = {id_map[c] for c in val_category_ids}
    for k, r in enumerate(rows):
        for column in ("ap_box", "ap_mask"):
            if k in contiguous_with_gt:
                assert 0.0 <= float(r[column]) <= 100.0
            else:
                assert r[column] == ""
    png = (inference / "per_class_ap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
