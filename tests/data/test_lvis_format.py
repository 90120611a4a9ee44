"""register_lvis_format on hand-written LVIS-format files, and its errors on bad input."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from drcl2.data import register_lvis_format

SQUARE = [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]]


def _lvis_dict():
    # three classes with non-contiguous ids; "lamp" in 2 images, "cup" in 1, "dog" in none
    return {
        "images": [
            {"id": 5, "height": 40, "width": 50, "file_name": "a/5.png", "neg_category_ids": [7]},
            {
                "id": 9,
                "height": 40,
                "width": 50,
                "coco_url": "http://images.cocodataset.org/val2017/9.jpg",
                "not_exhaustive_category_ids": [12],
            },
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 12,
                "bbox": [10, 10, 10, 10],
                "segmentation": SQUARE,
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 12,
                "bbox": [10, 10, 10, 10],
                "segmentation": SQUARE,
            },
            {
                "id": 3,
                "image_id": 9,
                "category_id": 3,
                "bbox": [1, 2, 3, 4],
                "segmentation": SQUARE,
            },
        ],
        "categories": [
            {"id": 12, "name": "lamp"},
            {"id": 3, "name": "cup"},
            {"id": 7, "name": "dog"},
        ],
    }


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_metadata_and_dicts_from_the_json(tmp_path):
    register_lvis_format("test_lvis_format_counts", _write(tmp_path, _lvis_dict()), str(tmp_path))
    meta = MetadataCatalog.get("test_lvis_format_counts")
    assert meta.thing_classes == ["cup", "dog", "lamp"]  # sorted by category id
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    assert meta.class_image_count == [
        {"id": 3, "image_count": 1},
        {"id": 7, "image_count": 0},
        {"id": 12, "image_count": 2},
    ]
    assert meta.class_frequency == ["r", "r", "r"]
    assert meta.evaluator_type == "lvis"

    dicts = DatasetCatalog.get("test_lvis_format_counts")
    assert [d["image_id"] for d in dicts] == [5, 9]
    assert dicts[0]["file_name"] == os.path.join(str(tmp_path), "a/5.png")
    assert dicts[1]["file_name"] == os.path.join(str(tmp_path), "val2017", "9.jpg")
    assert dicts[0]["neg_category_ids"] == [7] and dicts[1]["not_exhaustive_category_ids"] == [12]
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [2, 0]
    assert dicts[1]["annotations"][1]["bbox_mode"] == BoxMode.XYWH_ABS
    assert dicts[1]["annotations"][1]["segmentation"] == SQUARE


def test_frequency_fields_in_the_file_win(tmp_path):
    data = _lvis_dict()
    counts = {12: 150, 3: 11, 7: 10}
    for cat in data["categories"]:
        cat["image_count"] = counts[cat["id"]]
    register_lvis_format("test_lvis_format_fields", _write(tmp_path, data), str(tmp_path))
    meta = MetadataCatalog.get("test_lvis_format_fields")
    assert meta.class_frequency == ["c", "r", "f"]  # by LVIS's rule on the stored training counts
    assert [c["image_count"] for c in meta.class_image_count] == [11, 10, 150]


def test_missing_json_names_path_and_readme(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json.*datasets/README.md"):
        register_lvis_format("test_lvis_format_missing", missing, str(tmp_path))


def test_missing_image_root_names_path(tmp_path):
    json_file = _write(tmp_path, _lvis_dict())
    with pytest.raises(FileNotFoundError, match="no_images.*datasets/README.md"):
        register_lvis_format("test_lvis_format_noroot", json_file, str(tmp_path / "no_images"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.pop("categories"), "'categories' is missing"),
        (lambda d: d["annotations"][1].pop("bbox"), r"annotations\[1\] has no 'bbox'"),
        (lambda d: d["images"][0].pop("height"), r"images\[0\] has no 'height'"),
        (
            lambda d: d["images"][0].pop("file_name"),
            r"images\[0\] has neither 'file_name' nor 'coco_url'",
        ),
        (
            lambda d: d["annotations"][0].update(category_id=99),
            r"1 annotations in 1 images have category ids \[99\] that are not in 'categories'",
        ),
    ],
)
def test_not_lvis_format_says_which_field(tmp_path, corrupt, message):
    data = _lvis_dict()
    corrupt(data)
    json_file = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as e:
        register_lvis_format("test_lvis_format_bad", json_file, str(tmp_path))
    assert "ann.json" in str(e.value)
    assert "test_lvis_format_bad" not in DatasetCatalog.list()


def test_trainer_names_missing_dataset_files(tmp_path):
    from detectron2.config import get_cfg

    from drcl2 import Trainer, add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.DATASETS.TRAIN = ("lvis_v1_train",)  # detectron2's registration; the files are not here
    with pytest.raises(FileNotFoundError, match=r"lvis_v1_train.json.*section 'LVIS v1'"):
        Trainer.build_train_loader(cfg)
