"""The generated demo set: valid LVIS v1, long-tailed over all three groups, reproducible."""
import collections
import filecmp
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from lvis import LVIS

from drcl2.data import ToyLVISSpec, generate_toy_lvis
from drcl2.data.lvis_format import frequency_group
from drcl2.data.toy_lvis import TOY_CLASSES, toy_lvis_categories, toy_lvis_layout


def _all_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The default (demo) spec generated into a fresh folder."""
    return generate_toy_lvis(str(tmp_path_factory.mktemp("toy_a")))


def test_same_seed_gives_identical_bytes(demo_set, tmp_path):
    again = generate_toy_lvis(str(tmp_path))
    files = _all_files(demo_set["image_root"])
    assert files == _all_files(again["image_root"])
    assert len(files) == 800 + 200 + 400 + 3
    match, mismatch, errors = filecmp.cmpfiles(
        demo_set["image_root"], again["image_root"], files, shallow=False
    )
    assert mismatch == [] and errors == []


def test_other_seed_gives_other_data():
    a = toy_lvis_layout(ToyLVISSpec(seed=0), "train")[:5]
    b = toy_lvis_layout(ToyLVISSpec(seed=1), "train")[:5]
    assert a != b


def test_valid_lvis_v1_with_all_frequency_groups(demo_set):
    for split in ("train", "val", "test"):
        api = LVIS(demo_set[f"{split}_json"])  # the reference API accepts it
        assert len(api.cats) == len(TOY_CLASSES) == 30
    train = LVIS(demo_set["train_json"])
    images_per_class = collections.Counter(
        cat for img_id in train.imgs for cat in {a["category_id"] for a in train.img_ann_map[img_id]}
    )
    groups = collections.Counter()
    for cat in train.dataset["categories"]:
        # LVIS's rule on training image counts, and the stored count is the true one
        assert cat["image_count"] == images_per_class[cat["id"]]
        assert cat["frequency"] == frequency_group(cat["image_count"])
        groups[cat["frequency"]] += 1
    assert set(groups) == {"r", "c", "f"} and min(groups.values()) >= 3, groups


def test_lvis_fields(demo_set):
    data = json.load(open(demo_set["val_json"]))
    assert data["categories"] == json.load(open(demo_set["train_json"]))["categories"]
    anns_per_image = collections.defaultdict(set)
    for ann in data["annotations"]:
        anns_per_image[ann["image_id"]].add(ann["category_id"])
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] <= w * h
    objects_per_image = [len(a) for a in anns_per_image.values()]
    assert max(objects_per_image) >= 3  # several objects per image
    with_not_exhaustive = 0
    for img in data["images"]:
        assert max(img["width"], img["height"]) <= 128
        present = anns_per_image[img["id"]]
        assert img["neg_category_ids"] and not set(img["neg_category_ids"]) & present
        with_not_exhaustive += bool(img["not_exhaustive_category_ids"])
        assert os.path.isfile(os.path.join(demo_set["image_root"], img["file_name"]))
    assert with_not_exhaustive > 0


def test_test_split_is_held_out_from_val(demo_set):
    """lvis_v1_toy_test is drawn like val but from its own seeds: no image or layout is shared."""
    import hashlib

    def digests(split):
        data = json.load(open(demo_set[f"{split}_json"]))
        files = [os.path.join(demo_set["image_root"], img["file_name"]) for img in data["images"]]
        return data, {hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}

    val, val_hashes = digests("val")
    test, test_hashes = digests("test")
    assert len(test["images"]) == 400 >= len(val["images"])
    assert not val_hashes & test_hashes and len(test_hashes) == 400  # no pixel-identical image
    boxes = lambda d: {tuple(a["bbox"]) + (a["category_id"],) for a in d["annotations"]}  # noqa
    assert len(boxes(val) & boxes(test)) < 0.05 * len(boxes(test))  # only chance coincidences
    assert not {i["id"] for i in val["images"]} & {i["id"] for i in test["images"]}
    assert not {a["id"] for a in val["annotations"]} & {a["id"] for a in test["annotations"]}
    assert test["categories"] == val["categories"]  # training statistics, as LVIS does
    # drawn like val: every class has test boxes, in all three frequency groups
    assert {a["category_id"] for a in test["annotations"]} == set(range(1, 31))


def test_a_set_without_test_split_gets_it_added(demo_set, tmp_path):
    import shutil

    from drcl2.data import ensure_toy_lvis

    root = tmp_path / "old"
    shutil.copytree(os.path.dirname(demo_set["image_root"]), root)
    base = root / "lvis_v1_toy"
    shutil.rmtree(base / "test")
    os.remove(base / "annotations" / "lvis_v1_toy_test.json")  # a set made before the test split
    train_mtime = os.path.getmtime(base / "annotations" / "lvis_v1_toy_train.json")
    ensure_toy_lvis(str(root))
    files = [f for f in _all_files(demo_set["image_root"]) if "test" in f]
    assert len(files) == 401
    _, mismatch, errors = filecmp.cmpfiles(demo_set["image_root"], base, files, shallow=False)
    assert mismatch == [] and errors == []
    assert os.path.getmtime(base / "annotations" / "lvis_v1_toy_train.json") == train_mtime
    # a test folder without its annotation file is not ours to overwrite
    os.remove(base / "annotations" / "lvis_v1_toy_test.json")
    with pytest.raises(FileExistsError, match="not drcl2's to overwrite"):
        ensure_toy_lvis(str(root))


def test_registered_toy_datasets(toy_lvis_root):
    meta = MetadataCatalog.get("lvis_v1_toy_train")
    assert meta.evaluator_type == "lvis"
    assert meta.thing_classes == list(TOY_CLASSES)
    categories = toy_lvis_categories(ToyLVISSpec())
    assert meta.class_frequency == [c["frequency"] for c in categories]
    assert [c["image_count"] for c in meta.class_image_count] == [c["image_count"] for c in categories]
    dicts = DatasetCatalog.get("lvis_v1_toy_val")
    assert len(dicts) == 200
    assert len(DatasetCatalog.get("lvis_v1_toy_test")) == 400
    assert MetadataCatalog.get("lvis_v1_toy_test").evaluator_type == "lvis"
    assert all(0 <= a["category_id"] < 30 for d in dicts for a in d["annotations"])
    assert os.path.isfile(dicts[0]["file_name"])
