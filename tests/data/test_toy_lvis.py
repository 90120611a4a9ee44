"""The generated sets: valid LVIS v1, long-tailed over all three groups, reproducible; the default
(demo) set unchanged by the generalisation to more classes and LVIS's class shares."""

import collections
import filecmp
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import REPO_ROOT
from lvis import LVIS

from drcl2.data.generated import ToyLVISSpec, generate_toy_lvis
from drcl2.data.generated.toy_lvis import TOY_CLASSES, toy_lvis_categories, toy_lvis_layout
from drcl2.data.lvis_format import frequency_group


def _all_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The default (demo) spec generated into a fresh folder."""
    return generate_toy_lvis(str(tmp_path_factory.mktemp("toy_a")))


@pytest.mark.slow
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
        cat
        for img_id in train.imgs
        for cat in {a["category_id"] for a in train.img_ann_map[img_id]}
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


@pytest.mark.slow
def test_a_set_without_test_split_gets_it_added(demo_set, tmp_path):
    import shutil

    from drcl2.data.generated import ensure_toy_lvis

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
    assert [c["image_count"] for c in meta.class_image_count] == [
        c["image_count"] for c in categories
    ]
    dicts = DatasetCatalog.get("lvis_v1_toy_val")
    assert len(dicts) == 200
    assert len(DatasetCatalog.get("lvis_v1_toy_test")) == 400
    assert MetadataCatalog.get("lvis_v1_toy_test").evaluator_type == "lvis"
    assert all(0 <= a["category_id"] < 30 for d in dicts for a in d["annotations"])
    assert os.path.isfile(dicts[0]["file_name"])


# --------------------------------------------------------------------------------------------------
# The generalised generator: the default set unchanged, LVIS's class shares, more class identities
# --------------------------------------------------------------------------------------------------
def _set_digest(base):
    """sha256 over every file's relative path and sha256, in path order."""
    import hashlib

    h = hashlib.sha256()
    for rel in _all_files(base):
        with open(os.path.join(base, rel), "rb") as f:
            h.update(f"{rel}\n{hashlib.sha256(f.read()).hexdigest()}\n".encode())
    return h.hexdigest()


def test_default_set_is_byte_identical_to_the_original_generator(demo_set):
    """The demo / study set is exactly what the 30-class generator wrote before it was generalised
    (digests taken from that code, same Pillow / OpenCV / NumPy versions as .venv)."""
    import hashlib

    with open(demo_set["train_json"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == (
            "1270c0b0aee4fb16e1f8b3e18abf17d299f3eabbcfa5991b7fa26ba3f10f2921"
        ), (
            "the default train JSON changed (or a Pillow / OpenCV upgrade changed how shapes "
            "rasterise)"
        )
    assert (
        _set_digest(demo_set["image_root"])
        == "fe62cc665a9df32b2b9e639d3b3b6131386d9aaa5683f6a68c039577f38db9a7"
    )


SMALL_LVIS = ToyLVISSpec(
    name="lvis_v1_gen_small",
    num_classes=60,
    class_distribution="lvis",
    num_train_images=400,  # LVIS's frequent classes need > 100 training images each
    num_val_images=40,
    num_test_images=40,
    image_format="jpg",
    max_objects_per_image=8,
    min_object_scale=0.05,
    max_object_scale=0.14,
    max_total_box_occlusion=0.4,
)


@pytest.fixture(scope="module")
def small_lvis_set(tmp_path_factory):
    """A 60-class instance of the LVIS-shares generator (the large set's recipe, scaled down)."""
    return generate_toy_lvis(str(tmp_path_factory.mktemp("gen_small")), SMALL_LVIS)


@pytest.mark.slow
def test_lvis_distribution_is_deterministic_with_any_number_of_workers(
    small_lvis_set, tmp_path, monkeypatch
):
    from drcl2.data.generated import toy_lvis

    # forked rather than spawned here: the same chunking and ordering without two drcl2 imports
    # (spawning, the default, was checked the same way once: ~1 min on 2 busy cores)
    monkeypatch.setattr(toy_lvis, "_MP_CONTEXT", "fork")
    again = generate_toy_lvis(str(tmp_path), SMALL_LVIS, num_workers=2)
    files = _all_files(small_lvis_set["image_root"])
    assert files == _all_files(again["image_root"]) and len(files) == 400 + 40 + 40 + 3
    assert (
        files[-1].endswith(".jpg")
        and os.path.basename(small_lvis_set["train_json"]) == "lvis_v1_gen_small_train.json"
    )
    _, mismatch, errors = filecmp.cmpfiles(
        small_lvis_set["image_root"], again["image_root"], files, shallow=False
    )
    assert mismatch == [] and errors == []


def _image_and_instance_counts(api):
    images, instances = collections.Counter(), collections.Counter()
    for img_id in api.imgs:
        cats = [a["category_id"] for a in api.img_ann_map[img_id]]
        images.update(set(cats))
        instances.update(cats)
    return images, instances


def test_lvis_distribution_has_lvis_class_shares(small_lvis_set):
    for split in ("train", "val", "test"):
        api = LVIS(small_lvis_set[f"{split}_json"])  # the reference API accepts it
        assert len(api.cats) == 60
        if split != "train":  # val and test mix in a uniform share: every class has boxes there
            assert {a["category_id"] for a in api.dataset["annotations"]} == set(range(1, 61))
    train = LVIS(small_lvis_set["train_json"])
    images, instances = _image_and_instance_counts(train)
    groups = collections.Counter()
    for cat in train.dataset["categories"]:
        # the counts known at registration (without rendering) are the true ones
        assert cat["image_count"] == images[cat["id"]] >= 1
        assert cat["instance_count"] == instances[cat["id"]]
        assert cat["frequency"] == frequency_group(cat["image_count"])
        groups[cat["frequency"]] += 1
    lvis_shares = {"r": 337 / 1203, "c": 461 / 1203, "f": 405 / 1203}
    for group, share in lvis_shares.items():
        assert abs(groups[group] / 60 - share) < 0.01, groups
    per_image = collections.Counter(len(train.img_ann_map[i]) for i in train.imgs)
    assert min(per_image) >= 1 and max(per_image) <= 8


def test_large_set_statistics_without_rendering():
    """lvis_v1_gen_large: LVIS's shares over 300 classes; its registered counts match its layout."""
    from drcl2.data.generated import LVIS_GEN_LARGE

    categories = toy_lvis_categories(LVIS_GEN_LARGE)
    groups = collections.Counter(c["frequency"] for c in categories)
    assert groups == {"r": 84, "c": 115, "f": 101}
    images = collections.Counter()
    objects_per_image = []
    for img in toy_lvis_layout(LVIS_GEN_LARGE, "train"):
        annotated = [o["category"] for o in img["objects"] if o["annotated"]]
        assert len(set(annotated)) == len(annotated)  # one instance per class and image
        images.update(annotated)
        objects_per_image.append(len(annotated))
        assert 320 <= min(img["width"], img["height"]) and max(img["width"], img["height"]) <= 480
    assert [images[c] for c in range(300)] == [c["image_count"] for c in categories]
    assert (
        3.3 < sum(objects_per_image) / len(objects_per_image) < 3.7
    )  # LVIS v1: 3.6 classes per image


def test_class_vocabulary_extends_the_toy_classes_and_stays_distinct():
    from drcl2.data.generated.toy_classes import MAX_TOY_CLASSES, toy_classes
    from drcl2.data.generated.toy_lvis import _render_image

    classes = toy_classes(MAX_TOY_CLASSES)
    assert tuple(c.name for c in classes[:30]) == TOY_CLASSES  # the toy set's, in its order
    assert TOY_CLASSES[:3] == ("red_circle", "green_circle", "blue_circle")
    assert (
        len({c.name for c in classes})
        == len({(c.colour, c.shape, c.pattern) for c in classes})
        == 512
    )
    # every class drawn alone at the same pose on the same background: any two differ visibly
    spec = ToyLVISSpec(
        num_classes=MAX_TOY_CLASSES, min_image_size=48, max_image_size=48, max_object_scale=0.5
    )
    renders = (
        np.stack(
            [
                np.asarray(
                    _render_image(
                        spec,
                        "train",
                        {
                            "id": 1,
                            "width": 48,
                            "height": 48,
                            "objects": [
                                {
                                    "category": c,
                                    "center": (24.0, 24.0),
                                    "radius": 20.0,
                                    "angle": 0.3,
                                    "annotated": True,
                                }
                            ],
                        },
                    )[0]
                )
                for c in range(MAX_TOY_CLASSES)
            ]
        )
        .reshape(MAX_TOY_CLASSES, -1)
        .astype(np.float32)
    )
    sq = (renders**2).sum(1)
    dist = np.sqrt(
        np.maximum(sq[:, None] + sq[None, :] - 2 * renders @ renders.T, 0) / renders.shape[1]
    )
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 10, np.unravel_index(
        dist.argmin(), dist.shape
    )  # RMS difference per pixel value


def test_bad_specs_name_the_field():
    for kwargs, field in [
        ({"num_classes": 513}, "num_classes"),
        ({"class_distribution": "uniform"}, "class_distribution"),
        ({"image_format": "gif"}, "image_format"),
        ({"max_object_scale": 0.5}, "max_object_scale"),
        ({"num_val_images": 0}, "num_val_images"),
        ({"name": "a/b"}, "name"),
        ({"class_distribution": "lvis", "num_train_images": 100}, "num_train_images"),
    ]:
        with pytest.raises(ValueError, match=f"ToyLVISSpec.{field}"):
            ToyLVISSpec(**kwargs)
    with pytest.raises(ValueError, match="max_objects_per_image or num_classes"):
        ToyLVISSpec(class_distribution="lvis", num_classes=300, num_train_images=500)


def test_large_set_is_registered_without_generating(tmp_path):
    import dataclasses

    from drcl2.data.datasets import GENERATED_DATASETS, check_dataset_files, register_toy_lvis
    from drcl2.data.generated import LVIS_GEN_LARGE

    for split in ("train", "val", "test"):
        meta = MetadataCatalog.get(f"lvis_v1_gen_large_{split}")
        assert meta.evaluator_type == "lvis" and len(meta.thing_classes) == 300
        assert collections.Counter(meta.class_frequency) == {"r": 84, "c": 115, "f": 101}
        assert meta.json_file.endswith(
            f"lvis_v1_gen_large/annotations/lvis_v1_gen_large_{split}.json"
        )
        assert f"lvis_v1_gen_large_{split}" in GENERATED_DATASETS
    assert (
        min(
            c["image_count"]
            for c in MetadataCatalog.get("lvis_v1_gen_large_train").class_image_count
        )
        == 1
    )
    check_dataset_files(["lvis_v1_gen_large_train"])  # generated on use: not reported missing
    # what the import does, into an empty root: metadata only, not a file written
    register_toy_lvis(
        str(tmp_path), dataclasses.replace(LVIS_GEN_LARGE, name="lvis_v1_gen_large_probe")
    )
    assert os.listdir(tmp_path) == []
    assert len(MetadataCatalog.get("lvis_v1_gen_large_probe_val").thing_classes) == 300


def test_source_set_has_none_of_the_toy_classes_and_is_registered_without_generating():
    from drcl2.data.datasets import GENERATED_DATASETS
    from drcl2.data.generated.toy_lvis import TOY_SOURCE

    names = [c["name"] for c in toy_lvis_categories(TOY_SOURCE)]
    assert len(names) == len(set(names)) == 120
    assert not set(names) & set(TOY_CLASSES)
    # the vocabulary's classes 30-149, in its order: class i of the source is vocabulary[30 + i]
    from drcl2.data.generated.toy_classes import toy_classes

    assert names == [c.name for c in toy_classes(150)[30:]]
    meta = MetadataCatalog.get("lvis_v1_toy_source_train")
    assert meta.thing_classes == names and meta.evaluator_type == "lvis"
    assert {"lvis_v1_toy_source_train", "lvis_v1_toy_source_val"} <= set(GENERATED_DATASETS)
    # first_class 0 is the toy set itself
    assert [c["name"] for c in toy_lvis_categories(ToyLVISSpec())] == list(TOY_CLASSES)
    for kwargs, field in [
        ({"first_class": -1}, "first_class"),
        ({"first_class": 500, "num_classes": 13}, "num_classes"),
    ]:
        with pytest.raises(ValueError, match=f"ToyLVISSpec.{field}"):
            ToyLVISSpec(**kwargs)


@pytest.mark.slow
def test_import_drcl2_loads_no_generator():
    """The generated sets are registered by name: `import drcl2` imports none of the generators
    (drcl2.data.generated), and asking for a set's metadata imports them (and renders nothing)."""
    import subprocess
    import sys

    code = (
        "import sys, drcl2\n"
        "from detectron2.data import MetadataCatalog\n"
        "before = sorted(m for m in sys.modules if m.startswith('drcl2.data.generated'))\n"
        "n = len(MetadataCatalog.get('lvis_v1_gen_large_val').thing_classes)\n"
        "after = sorted(m for m in sys.modules if m.startswith('drcl2.data.generated'))\n"
        "print(before, n, 'drcl2.data.generated.toy_lvis' in after)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "[] 300 True"
