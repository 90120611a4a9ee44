"""
A custom dataset in the README's minimal LVIS layout (no ``frequency``, ``image_count``, ``area``,
``neg_category_ids`` nor ``not_exhaustive_category_ids``) evaluates with both backends, its r/c/f
groups derived from the training image counts.
"""

import csv
import json
import logging
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from drcl2.data import register_lvis_format
from drcl2.evaluation import LVISEvaluator

TOL = 1e-3
SIZE = 64
# training images per class: apple 150 (f), banjo 20 (c), cactus 2 (r) -- in the val json each is in
# one image, so the val file's own counts would make all three rare.
TRAIN_IMAGES = {1: 150, 2: 20, 3: 2}
VAL_BOXES = {
    1: (1, [4, 4, 20, 20]),
    2: (1, [30, 30, 24, 16]),
    3: (2, [10, 10, 30, 30]),
}  # cat: (image, XYWH)


def _write_json(path, images, annotations):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    categories = [
        {"id": 1, "name": "apple"},
        {"id": 2, "name": "banjo"},
        {"id": 3, "name": "cactus"},
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


@pytest.fixture
def my_data(tmp_path):
    """datasets/README.md's example: my_data_train / my_data_val, minimal fields only."""
    root = tmp_path / "my"
    images = root / "images"
    train = [
        {"id": i, "height": SIZE, "width": SIZE, "file_name": f"train_{i}.png"}
        for i in range(1, 151)
    ]
    train_anns = [
        {"id": len(train) * c + i, "image_id": i, "category_id": c, "bbox": [4, 4, 20, 20]}
        for c, n in TRAIN_IMAGES.items()
        for i in range(1, n + 1)
    ]
    val = [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"val_{i}.png"} for i in (1, 2)]
    val_anns = [
        {"id": c, "image_id": i, "category_id": c, "bbox": b} for c, (i, b) in VAL_BOXES.items()
    ]
    os.makedirs(images)
    for img in train + val:
        Image.new("RGB", (SIZE, SIZE), (120, 120, 120)).save(images / img["file_name"])
    _write_json(str(root / "annotations" / "train.json"), train, train_anns)
    _write_json(str(root / "annotations" / "val.json"), val, val_anns)
    names = {"train": f"my_data_train_{os.getpid()}", "val": f"my_data_val_{os.getpid()}"}
    register_lvis_format(names["train"], str(root / "annotations" / "train.json"), str(images))
    register_lvis_format(names["val"], str(root / "annotations" / "val.json"), str(images))
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


class _FixedDetections(torch.nn.Module):
    """A stand-in detector: apple and cactus found exactly, banjo missed (a box elsewhere)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            dets = {
                1: [([4, 4, 24, 24], 0.9, 0), ([40, 40, 60, 60], 0.8, 1)],
                2: [([10, 10, 40, 40], 0.9, 2)],
            }
            boxes, scores, classes = zip(*dets[x["image_id"]])
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.tensor(classes)
            outputs.append({"instances": inst})
        return outputs


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_readme_minimal_layout_evaluates_with_training_groups(
    my_data, tmp_path, backend, drcl2_log, one_thread
):
    from detectron2.config import get_cfg

    from drcl2 import Trainer, add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (my_data["train"],), (my_data["val"],)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.TEST.DRCL2.LVIS_BACKEND = backend
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = SIZE, SIZE
    cfg.OUTPUT_DIR = str(tmp_path / "out")

    results = Trainer.test(cfg, _FixedDetections())[
        "bbox"
    ]  # one test set: its results, as detectron2

    # groups from the training counts: apple f (AP 100), banjo c (AP 0), cactus r (AP 100)
    assert results["APf"] == pytest.approx(100.0, abs=TOL)
    assert results["APc"] == pytest.approx(0.0, abs=TOL)
    assert results["APr"] == pytest.approx(100.0, abs=TOL)
    assert results["AP"] == pytest.approx(200 / 3, abs=TOL)
    messages = [r.getMessage() for r in drcl2_log.records]
    assert any(
        "3 of 3 categories have no 'frequency'; derived their r/c/f groups with LVIS's rule" in m
        and f"from the training image counts of ['{my_data['train']}']: 1 r, 1 c, 1 f." in m
        for m in messages
    ), messages
    with open(tmp_path / "out" / "inference" / "per_class_ap.csv") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert [
        (rows[c]["frequency_group"], rows[c]["train_image_count"])
        for c in ("apple", "banjo", "cactus")
    ] == [("f", "150"), ("c", "20"), ("r", "2")]


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_without_training_counts_groups_come_from_the_evaluated_json(
    my_data, tmp_path, backend, drcl2_log
):
    evaluator = LVISEvaluator(
        my_data["val"], distributed=False, output_dir=str(tmp_path), backend=backend
    )
    evaluator.reset()
    model = _FixedDetections()
    for image_id in (1, 2):
        inputs = [{"image_id": image_id, "height": SIZE, "width": SIZE}]
        evaluator.process(inputs, model(inputs))
    results = evaluator.evaluate()["bbox"]
    # each class is in one val image: all rare
    assert results["APr"] == pytest.approx(200 / 3, abs=TOL)
    assert results["APc"] == results["APf"] == -100.0
    warnings = [r.getMessage() for r in drcl2_log.records if r.levelno == logging.WARNING]
    assert any(
        "from the image counts of" in m and "itself, as no training counts are known" in m
        for m in warnings
    )


def test_fields_the_json_has_are_kept(tmp_path):
    from drcl2.evaluation.lvis_evaluation import complete_lvis_ground_truth

    square = [[0, 0, 10, 0, 10, 10, 0, 10]]
    dataset = {
        "images": [{"id": 1, "height": 20, "width": 20, "neg_category_ids": [2]}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 55.0},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 10, 12],
                "segmentation": square,
            },
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 12]},
        ],
        "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b"}],
    }
    complete_lvis_ground_truth(dataset, {1: 3, 2: 500})
    assert dataset["categories"] == [
        {
            "id": 1,
            "name": "a",
            "frequency": "f",
        },  # kept, though 3 training images would make it "r"
        {"id": 2, "name": "b", "frequency": "f", "image_count": 500},
    ]
    assert [a["area"] for a in dataset["annotations"]] == [55.0, 100.0, 120.0]  # kept, polygon, box
    assert dataset["images"][0]["neg_category_ids"] == [2]
    assert dataset["images"][0]["not_exhaustive_category_ids"] == []
