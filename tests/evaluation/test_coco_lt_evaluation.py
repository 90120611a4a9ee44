"""COCO-LT: the split script on a generated COCO file, AP1-AP4 grouping, the evaluator, the
configs."""

import csv
import importlib.util
import json
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from helpers import REPO_ROOT

from drcl2 import add_drcl2_config
from drcl2.data.coco_lt import class_counts, coco_lt_group, coco_lt_targets, make_coco_lt
from drcl2.engine import Trainer
from drcl2.evaluation import COCOLTEvaluator

REPO = REPO_ROOT


def _prepare_coco_lt_module():
    spec = importlib.util.spec_from_file_location(
        "prepare_coco_lt", os.path.join(REPO, "datasets", "prepare_coco_lt.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coco_file(images_per_class, instances_per_image, multi_label_every=0):
    """
    A COCO-format train json: class k (id 10 * (k + 1)) is alone in ``images_per_class[k]`` images
    with ``instances_per_image[k]`` instances each. With ``multi_label_every`` > 0, every such image
    of the most frequent class also contains one instance of each other class.
    """
    categories = [{"id": 10 * (k + 1), "name": f"c{k}"} for k in range(len(images_per_class))]
    images, annotations = [], []
    for k, (n_img, n_inst) in enumerate(zip(images_per_class, instances_per_image)):
        for _ in range(n_img):
            image_id = len(images) + 1
            images.append(
                {"id": image_id, "width": 64, "height": 48, "file_name": f"{image_id}.jpg"}
            )
            cats = [categories[k]["id"]] * n_inst
            if multi_label_every and k == 0 and image_id % multi_label_every == 0:
                cats += [c["id"] for c in categories[1:]]
            for cat_id in cats:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_id,
                        "bbox": [1, 1, 10, 10],
                        "area": 100,
                        "iscrowd": 0,
                    }
                )
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 1,
            "category_id": 10,
            "bbox": [0, 0, 5, 5],
            "area": 25,
            "iscrowd": 1,
        }
    )  # crowd: never counted
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize(
    "count, group",
    [(0, 0), (1, 1), (19, 1), (20, 2), (399, 2), (400, 3), (7999, 3), (8000, 4), (10**6, 4)],
)
def test_coco_lt_groups(count, group):
    assert coco_lt_group(count) == group


def test_targets_follow_lvis_curve():
    available = {1: 5000, 2: 3000, 3: 3000, 4: 40, 5: 2}
    targets = coco_lt_targets(available)
    # LVIS v1's most frequent class is in 1,977 training images, its rarest in 1.
    assert targets[1] == 1977
    assert targets[5] == 1
    assert targets[1] >= targets[2] >= targets[3] >= targets[4] >= targets[5]
    assert targets[4] <= 40  # never more than available
    assert coco_lt_targets(available, scale=0.01)[1] == 20  # round(0.01 * 1977)
    with pytest.raises(ValueError, match="scale"):
        coco_lt_targets(available, scale=0)


def test_prepare_coco_lt_script_on_generated_coco(tmp_path):
    images_per_class = [300, 120, 60, 25, 10, 4]
    instances_per_image = [3, 2, 1, 2, 1, 5]
    coco = _coco_file(images_per_class, instances_per_image)
    src, dst = tmp_path / "train.json", tmp_path / "lt.json"
    src.write_text(json.dumps(coco))
    _prepare_coco_lt_module().main(
        ["--input", str(src), "--output", str(dst), "--seed", "3", "--scale", "0.1"]
    )
    subset = json.loads(dst.read_text())

    available = {10 * (k + 1): n for k, n in enumerate(images_per_class)}
    targets = coco_lt_targets(available, scale=0.1)
    counts = class_counts(subset)
    for k, cat in enumerate(coco["categories"]):
        # One class per image: every target is met exactly, with all of each image's instances.
        assert counts[cat["id"]]["image_count"] == targets[cat["id"]] <= images_per_class[k]
        assert counts[cat["id"]]["instance_count"] == targets[cat["id"]] * instances_per_image[k]
    assert targets[10] == round(0.1 * 1977) == 198 and targets[60] == 1
    # Kept images keep all their annotations; nothing else is kept.
    kept = {img["id"] for img in subset["images"]}
    assert [a for a in coco["annotations"] if a["image_id"] in kept] == subset["annotations"]
    assert subset["categories"] == coco["categories"]
    assert subset["info"]["coco_lt_seed"] == 3
    # The seed picks which images, not how many.
    again, _ = make_coco_lt(coco, seed=3, scale=0.1)
    other, _ = make_coco_lt(coco, seed=4, scale=0.1)
    assert again["images"] == subset["images"]
    assert {i["id"] for i in other["images"]} != kept and len(other["images"]) == len(kept)


def test_no_class_exceeds_its_target_with_multi_label_images():
    coco = _coco_file([400, 60, 30, 12], [1, 1, 1, 1], multi_label_every=5)
    subset, report = make_coco_lt(coco, seed=0, scale=0.05)
    for cat_id, r in report.items():
        assert 1 <= r["image_count"] <= r["target"]
    rare = min(report, key=lambda c: report[c]["target"])
    assert report[rare]["image_count"] == report[rare]["target"]  # rare classes are served first


def test_script_fails_clearly_without_input(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        _prepare_coco_lt_module().main(["--coco-root", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# COCOLTEvaluator on a case with known per-class AP and known training instance counts.
# ------------------------------------------------------------------------------------------------
TRAIN_INSTANCES = {1: 5, 2: 100, 3: 1000, 4: 9000}  # one class in each of AP1..AP4


@pytest.fixture
def coco_lt_case(tmp_path):
    train = {
        "images": [
            {"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in range(1, 101)
        ],
        "categories": [{"id": c, "name": f"class{c}"} for c in TRAIN_INSTANCES],
        "annotations": [],
    }
    for cat_id, n in TRAIN_INSTANCES.items():
        for j in range(n):
            train["annotations"].append(
                {
                    "id": len(train["annotations"]) + 1,
                    "image_id": 1 + (j * cat_id) % 100,
                    "category_id": cat_id,
                    "bbox": [0, 0, 8, 8],
                    "area": 64,
                    "iscrowd": 0,
                }
            )
    # Val: one instance of each class in image 1 (class 3 twice, for an AP of 50 on class 2).
    boxes = {1: [2, 2, 10, 10], 2: [20, 2, 12, 12], 3: [2, 30, 16, 16], 4: [40, 40, 20, 20]}
    val = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "v1.jpg"}],
        "categories": train["categories"],
        "annotations": [
            {
                "id": c,
                "image_id": 1,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
                "segmentation": [
                    [b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]
                ],
            }
            for c, b in boxes.items()
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    names = {
        "train": f"test_cocolt_train_{tmp_path.name}",
        "val": f"test_cocolt_val_{tmp_path.name}",
    }
    common = dict(
        thing_classes=[f"class{c}" for c in TRAIN_INSTANCES],
        thing_dataset_id_to_contiguous_id={c: k for k, c in enumerate(TRAIN_INSTANCES)},
    )
    MetadataCatalog.get(names["train"]).set(json_file=str(tmp_path / "train.json"), **common)
    MetadataCatalog.get(names["val"]).set(
        json_file=str(tmp_path / "val.json"),
        evaluator_type="coco_lt",
        train_dataset_name=names["train"],
        **common,
    )
    yield names, boxes
    for name in names.values():
        MetadataCatalog.remove(name)


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_coco_lt_evaluator_groups_by_training_instances(coco_lt_case, tmp_path):
    names, boxes = coco_lt_case
    out = tmp_path / "inference"
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = Trainer.build_evaluator(cfg, names["val"])
    assert isinstance(evaluator, COCOLTEvaluator)
    evaluator.reset()
    # class 1 and 4 hit (AP 100); class 2: a miss scored above the hit (AP 50); class 3 missed (AP
    # 0).
    dets = [
        (_xyxy(boxes[1]), 0.9, 0),
        (_xyxy(boxes[4]), 0.8, 3),
        ([40, 0, 50, 10], 0.7, 1),
        (_xyxy(boxes[2]), 0.6, 1),
    ]
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32))
    inst.scores = torch.tensor([d[1] for d in dets])
    inst.pred_classes = torch.tensor([d[2] for d in dets])
    masks = torch.zeros(len(dets), 64, 64, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(d[0] for d in dets):
        masks[k, y0:y1, x0:x1] = True
    inst.pred_masks = masks
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    results = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert results[task]["AP1"] == pytest.approx(100.0)
        assert results[task]["AP2"] == pytest.approx(50.0)
        assert results[task]["AP3"] == pytest.approx(0.0)
        assert results[task]["AP4"] == pytest.approx(100.0)
        assert results[task]["AP"] == pytest.approx(62.5)  # COCO's own metric is untouched
    with open(out / "per_class_ap.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "class",
        "frequency_group",
        "train_image_count",
        "train_instance_count",
        "ap_box",
        "ap_mask",
    ]
    assert [(r["class"], r["frequency_group"], int(r["train_instance_count"])) for r in rows] == [
        ("class1", "AP1", 5),
        ("class2", "AP2", 100),
        ("class3", "AP3", 1000),
        ("class4", "AP4", 9000),
    ]
    assert [int(r["train_image_count"]) for r in rows] == [5, 50, 100, 25]  # distinct (j * c) % 100
    assert [float(r["ap_box"]) for r in rows] == pytest.approx([100, 50, 0, 100])
    assert [float(r["ap_mask"]) for r in rows] == pytest.approx([100, 50, 0, 100])
    assert (out / "per_class_ap.png").read_bytes()[:4] == b"\x89PNG"


def test_coco_lt_evaluator_needs_a_training_set(coco_lt_case):
    names, _ = coco_lt_case
    MetadataCatalog.get("test_cocolt_no_train").set(
        json_file=MetadataCatalog.get(names["val"]).json_file
    )
    try:
        with pytest.raises(ValueError, match="train_dataset_name"):
            COCOLTEvaluator("test_cocolt_no_train")
    finally:
        MetadataCatalog.remove("test_cocolt_no_train")


@pytest.mark.parametrize(
    "config, train, test",
    [
        ("COCO-LT/mask_rcnn_R_50_FPN_1x.yaml", "coco_lt_train", "coco_lt_val"),
        ("COCO/mask_rcnn_R_50_FPN_1x.yaml", "coco_2017_train", "coco_2017_val"),
    ],
)
def test_configs_load(config, train, test):
    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    assert cfg.DATASETS.TRAIN == (train,) and cfg.DATASETS.TEST == (test,)
    assert (
        cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
        and cfg.MODEL.MASK_ON
        and cfg.MODEL.RESNETS.DEPTH == 50
    )
    assert cfg.SOLVER.MAX_ITER == 90000 and cfg.SOLVER.STEPS == (60000, 80000)  # 1x
    assert train in DatasetCatalog.list() and test in DatasetCatalog.list()
    expected = "coco_lt" if test == "coco_lt_val" else "coco"
    assert MetadataCatalog.get(test).evaluator_type == expected
