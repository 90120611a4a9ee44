"""drcl2.data.dataset_check, the check_dataset tool and the Trainer's check before the first
step."""

import io
import json
import logging
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from PIL import Image

from drcl2.data import load_lvis_format_json, register_lvis_format
from drcl2.data.dataset_check import DatasetCheckError, check_dataset_dicts, check_datasets
from drcl2.tools import check_dataset as check_dataset_tool

SIZE = 64  # every image is SIZE x SIZE


def _png(path, size=(SIZE, SIZE)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, dtype=np.uint8)).save(path)


def _truncated_jpeg(path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95
    )
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # a real JPEG, cut short


# (annotation id, image id, box XYWH, what detectron2's training mapper does with it)
BOXES = [
    (1, 1, [4, 4, 20, 20], "kept"),
    (2, 1, [10, 10, 0, 12], "zero_area"),
    (3, 2, [30, 30, 8, 0], "zero_area"),
    (4, 2, [20, 20, -5, 10], "negative_size"),
    (5, 3, [70, 10, 10, 10], "outside_image"),  # right of the 64 px image
    (6, 3, [-20, 5, 10, 10], "outside_image"),  # left of it
    (7, 3, [-4, 40, 20, 20], "clipped"),  # reaches over the left border: clipped, kept
    (8, 4, [50, 50, 30, 30], "clipped"),
    (9, 4, [0, 0, SIZE, SIZE], "kept"),  # exactly the image
]


def _minimal_layout(root, boxes=BOXES, missing=(), categories=((1, "apple"), (2, "banjo"))):
    """The README's layout: <root>/annotations/train.json (minimal fields), <root>/images/*.png."""
    images = [
        {"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)
    ]
    for img in images:
        if img["id"] not in missing:
            _png(os.path.join(root, "images", img["file_name"]))
    anns = [{"id": a, "image_id": i, "category_id": 1 + a % 2, "bbox": b} for a, i, b, _ in boxes]
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in categories],
    }
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    json_file = os.path.join(root, "annotations", "train.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, os.path.join(root, "images")


def _dicts(tmp_path, **kw):
    json_file, image_root = _minimal_layout(str(tmp_path), **kw)
    return load_lvis_format_json(json_file, image_root)


def test_report_counts_each_kind_and_names_the_cases(tmp_path):
    report = check_dataset_dicts(_dicts(tmp_path, missing=(2,)), source="train.json", num_classes=2)
    counts = {k: (f.count, len(f.images)) for k, f in report.findings.items()}
    assert counts == {
        "missing_file": (1, 1),
        "zero_area": (2, 2),
        "negative_size": (1, 1),
        "outside_image": (2, 1),
        "clipped": (2, 2),
    }
    lines = report.lines()
    assert lines[0] == f"error: missing image files: 1 image ({tmp_path / 'images' / '2.png'})"
    zero = report.findings["zero_area"]
    assert (
        "warning: boxes of zero area: 2 annotations in 2 images; dropped for training, as "
        f"detectron2 drops empty boxes ({zero.cases[0]}; {zero.cases[1]})"
    ) in lines
    assert zero.cases[0] == f"{tmp_path / 'images' / '1.png'}, annotation id 2"
    assert [f.kind for f in report.errors] == ["missing_file"]
    assert report.num_images == 4 and report.num_annotations == len(BOXES)
    with pytest.raises(
        DatasetCheckError,
        match=r"train.json: 4 images, 9 annotations.*\n  error: missing image files: 1 image",
    ):
        report.raise_if_errors()


def test_dropped_boxes_are_those_detectron2_drops(tmp_path):
    """What the report calls dropped is exactly what detectron2's DatasetMapper removes in
    training."""
    dicts = _dicts(tmp_path)
    report = check_dataset_dicts(dicts, num_classes=2)
    reported = {}
    for kind, finding in report.findings.items():
        assert finding.count == sum(1 for *_, k in BOXES if k == kind)
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    for record in dicts:
        boxes = mapper(record)["instances"].gt_boxes.tensor.tolist()
        for ann in record["annotations"]:
            kind = next(k for a, *_, k in BOXES if a == ann["id"])
            x, y, w, h = ann["bbox"]
            clipped = [max(x, 0), max(y, 0), min(x + w, SIZE), min(y + h, SIZE)]
            kept = clipped in boxes
            reported[ann["id"]] = kind
            assert kept == (kind in ("kept", "clipped")), (ann, kind, boxes)
    assert len(reported) == len(BOXES)


def test_unknown_category_ids_and_malformed_boxes_are_errors(tmp_path):
    # a loader whose contiguous ids run past the classes (detectron2's LVIS v1 loader subtracts 1
    # from
    # any id); an LVIS-format json with such ids is refused on loading (test_lvis_format)
    dicts = _dicts(tmp_path)
    dicts[1]["annotations"][0]["category_id"] = 5
    dicts[3]["annotations"][1]["category_id"] = -1
    dicts[0]["annotations"][0]["bbox"] = [1, 2, 3]
    dicts[2]["annotations"][2]["bbox"] = [1, 2, float("nan"), 4]
    report = check_dataset_dicts(dicts, num_classes=2)
    assert [f.kind for f in report.errors] == ["unknown_category", "malformed_box"]
    lines = report.lines()
    images = tmp_path / "images"
    assert lines[0] == (
        "error: category ids outside the dataset's classes (contiguous ids 0..1) [-1, 5]: 2 "
        f"annotations in 2 images ({images / '2.png'}, annotation id 3; "
        f"{images / '4.png'}, annotation id 9)"
    )
    assert lines[1] == (
        "error: boxes that are not four finite numbers: 2 annotations in 2 images "
        f"({images / '1.png'}, annotation id 1; {images / '3.png'}, annotation id 7)"
    )
    assert report.findings["clipped"].count == 1  # annotation 7, now malformed, is not also clipped


def test_images_are_decoded_only_when_asked(tmp_path):
    json_file, image_root = _minimal_layout(str(tmp_path), boxes=BOXES[:1])
    _truncated_jpeg(
        os.path.join(image_root, "2.png")
    )  # the decoder reads the content, not the name
    _png(os.path.join(image_root, "3.png"), size=(SIZE, SIZE + 8))
    dicts = load_lvis_format_json(json_file, image_root)
    assert check_dataset_dicts(dicts).findings == {}
    report = check_dataset_dicts(dicts, decode_images=True)
    assert [(k, f.count) for k, f in report.findings.items()] == [
        ("undecodable", 1),
        ("size_mismatch", 1),
    ]
    assert report.findings["undecodable"].first.startswith(
        os.path.join(image_root, "2.png") + ": OSError"
    )
    assert report.findings["size_mismatch"].first == (
        f"{os.path.join(image_root, '3.png')}: decoded 64x72, the dataset says 64x64"
    )
    # the same with two decoding processes
    parallel = check_dataset_dicts(dicts, decode_images=True, num_workers=2)
    assert parallel.lines() == report.lines()


def test_existence_takes_one_listing_per_folder(tmp_path, monkeypatch):
    """No stat per image: 2,000 images in two folders cost two directory listings."""
    import drcl2.data.dataset_check as dc

    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        for i in range(1000):
            (tmp_path / sub / f"{i}.jpg").touch()
    dicts = [
        {"file_name": str(tmp_path / sub / f"{i}.jpg")} for sub in ("a", "b") for i in range(1000)
    ]
    dicts.append({"file_name": str(tmp_path / "a" / "gone.jpg")})
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(dc.os, "scandir", lambda p: listings.append(p) or real_scandir(p))
    for stat_like in ("exists", "isfile", "lexists"):
        monkeypatch.setattr(dc.os.path, stat_like, lambda p: pytest.fail("stat per file"))
    monkeypatch.setattr(dc.os, "stat", lambda p, **kw: pytest.fail("stat per file"))
    monkeypatch.setattr(dc.PathManager, "exists", lambda p: pytest.fail("stat per file"))
    report = check_dataset_dicts(dicts)
    assert sorted(listings) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert report.findings["missing_file"].count == 1
    assert report.findings["missing_file"].first == str(tmp_path / "a" / "gone.jpg")


def test_tool_on_a_json_and_on_a_name(tmp_path, capsys):
    json_file, image_root = _minimal_layout(str(tmp_path))
    # warnings only: exit status 0, every finding printed
    assert check_dataset_tool.main([json_file, "--image-root", image_root]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"{json_file}: 4 images, 9 annotations; checked files, categories and boxes: 0 kinds of "
        "error"
    )
    assert (
        "warning: boxes entirely outside the image: 2 annotations in 1 image; dropped for training"
        in out
    )
    # a truncated image: found with --images only, exit status 1
    _truncated_jpeg(os.path.join(image_root, "4.png"))
    assert check_dataset_tool.main([json_file, "--image-root", image_root]) == 0
    capsys.readouterr()
    assert (
        check_dataset_tool.main(
            [json_file, "--image-root", image_root, "--images", "--num-workers", "1"]
        )
        == 1
    )
    assert (
        "error: images that cannot be decoded (truncated, or not an image): 1 image ("
        f"{image_root}/4.png: " in (capsys.readouterr().out)
    )
    # a registered name; a json without --image-root; a json with unknown categories
    name = f"test_check_tool_{os.getpid()}"
    register_lvis_format(name, json_file, image_root)
    try:
        os.remove(os.path.join(image_root, "3.png"))
        assert check_dataset_tool.main([name]) == 1
        assert (
            f"error: missing image files: 1 image ({image_root}/3.png)" in capsys.readouterr().out
        )
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    with pytest.raises(SystemExit):
        check_dataset_tool.main([json_file])
    assert "--image-root" in capsys.readouterr().err
    data = json.load(open(json_file))
    data["annotations"][0]["category_id"] = 7
    json.dump(data, open(json_file, "w"))
    assert check_dataset_tool.main([json_file, "--image-root", image_root]) == 1
    assert "category ids [7] that are not in 'categories'" in capsys.readouterr().err


def test_every_bad_file_is_counted_and_named(tmp_path, capsys):
    """Seven missing images: the report names five and says how many more; --all names all."""
    json_file, image_root = _minimal_layout(str(tmp_path))
    data = json.load(open(json_file))
    extra = [dict(data["images"][0], id=100 + i, file_name=f"gone{i}.png") for i in range(7)]
    data["images"] += extra
    json.dump(data, open(json_file, "w"))
    assert check_dataset_tool.main([json_file, "--image-root", image_root]) == 1
    out = capsys.readouterr().out
    assert ": 1 kind of error, 4 kinds of warning." in out  # singular and plural
    gone = [f"{image_root}/gone{i}.png" for i in range(7)]
    assert f"error: missing image files: 7 images ({'; '.join(gone[:5])}; and 2 more)" in out
    assert check_dataset_tool.main([json_file, "--image-root", image_root, "--all"]) == 1
    assert f"error: missing image files: 7 images ({'; '.join(gone)})" in capsys.readouterr().out


def _cfg(train, test):
    from detectron2.config import get_cfg

    from drcl2 import add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (test,)
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def test_trainer_checks_training_and_test_sets_before_the_first_step(tmp_path, drcl2_log):
    from drcl2 import Trainer

    train_json, train_root = _minimal_layout(str(tmp_path / "train"))
    test_json, test_root = _minimal_layout(str(tmp_path / "test"), boxes=BOXES[:1], missing=(3,))
    pid = os.getpid()
    train, test = f"test_check_trainer_train_{pid}", f"test_check_trainer_test_{pid}"
    register_lvis_format(train, train_json, train_root)
    register_lvis_format(test, test_json, test_root)
    try:
        cfg = _cfg(train, test)
        # the test set is broken: refused at start, before any training step
        with pytest.raises(
            DatasetCheckError,
            match=rf"dataset '{test}'.*\n  error: missing image files: 1 image "
            rf"\({test_root}/3.png\)",
        ):
            Trainer.build_train_dataset(cfg)
        # the training set's degenerate boxes were reported, not dropped silently
        warnings = [r.getMessage() for r in drcl2_log.records if r.levelno == logging.WARNING]
        assert any(f"datasets '{train}'" in m or f"dataset '{train}'" in m for m in warnings), (
            warnings
        )
        assert any("warning: boxes of zero area: 2 annotations in 2 images" in m for m in warnings)
        # repaired, the run starts; the test loader does not check again
        _png(os.path.join(test_root, "3.png"))
        dicts = Trainer.build_train_dataset(cfg)
        assert len(dicts) == 4
        drcl2_log.clear()
        Trainer.build_test_loader(cfg, test)
        assert not [r for r in drcl2_log.records if r.name == "drcl2.data.dataset_check"]
        # a missing training image is an error too, with --images-like decoding when asked
        os.remove(os.path.join(train_root, "1.png"))
        with pytest.raises(DatasetCheckError, match=rf"{train_root}/1.png"):
            Trainer.build_train_dataset(cfg)
        _truncated_jpeg(os.path.join(train_root, "1.png"))
        Trainer.build_train_dataset(cfg)  # not decoded by default
        cfg.DATASETS.DRCL2.CHECK_IMAGES = True
        with pytest.raises(
            DatasetCheckError,
            match=rf"cannot be decoded.*: 1 image \({train_root}/1.png: OSError",
        ):
            Trainer.build_train_dataset(cfg)
    finally:
        for name in (train, test):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_check_datasets_checks_a_registered_name_once(tmp_path):
    json_file, image_root = _minimal_layout(str(tmp_path), boxes=BOXES[:1])
    name = f"test_check_once_{os.getpid()}"
    calls = []
    DatasetCatalog.register(
        name, lambda: calls.append(1) or load_lvis_format_json(json_file, image_root)
    )
    MetadataCatalog.get(name).set(thing_classes=["apple", "banjo"])
    try:
        assert len(check_datasets([name])) == 1
        assert check_datasets([name]) == []
        assert len(calls) == 1
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
