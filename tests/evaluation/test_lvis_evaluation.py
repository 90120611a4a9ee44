"""
drcl2's LVISEvaluator: parity of the faster-coco-eval backend with the reference lvis API, and the
per-class report. All data are generated (no downloads).
"""

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis
from detectron2.structures import Boxes, Instances

from drcl2.data.generated.synthetic_lvis import synthetic_lvis_detections, synthetic_lvis_gt
from drcl2.evaluation import LVISEvaluator, evaluate_lvis, patch_lvis_numpy
from drcl2.evaluation.lvis_evaluation import LVIS_METRICS, limit_dets_per_image

TOL = 1e-4  # on metrics in percent, as detectron2 reports them


def _categories():
    """24 categories over r / c / f, 4 of which never get ground truth."""
    freqs = ["r"] * 8 + ["c"] * 8 + ["f"] * 8
    counts = (
        [3, 5, 8, 2, 9, 1, 6, 4]
        + [20, 50, 80, 15, 30, 60, 90, 40]
        + [150, 300, 800, 200, 500, 1000, 120, 250]
    )
    return [
        {"id": i + 1, "name": f"class_{i + 1}", "frequency": f, "image_count": n}
        for i, (f, n) in enumerate(zip(freqs, counts))
    ]


@pytest.fixture(scope="module")
def lvis_case(tmp_path_factory):
    """
    Generated LVIS-style ground truth (60 images, sizes 48-360 px so all area ranges occur) and
    detections: negative and not-exhaustive categories, images without ground truth, images
    without predictions, score ties, a crowd-flagged annotation, classes without ground truth.
    """
    patch_lvis_numpy()
    from lvis import LVIS

    cats = _categories()
    annotated = [c for c in cats if c["id"] not in (4, 12, 20, 24)]
    gt = synthetic_lvis_gt(
        60, annotated, seed=3, image_size=(48, 360), not_exhaustive_prob=0.3, empty_image_prob=0.1
    )
    gt["categories"] = cats
    # Classes without any ground truth still get (false-positive) detections through neg lists.
    for img in gt["images"][::3]:
        img["neg_category_ids"] = sorted(set(img["neg_category_ids"]) | {4, 12, 20, 24})
    gt["annotations"][0]["iscrowd"] = 1  # the lvis API ignores crowd flags; so must we
    dets = synthetic_lvis_detections(gt, dets_per_image=25, seed=4, empty_image_prob=0.15)
    for img in gt["images"][::3]:
        dets.extend(
            {
                "image_id": img["id"],
                "category_id": c,
                "bbox": [1.0, 1.0, 20.0, 20.0],
                "score": 0.5,
                "segmentation": _rect_rle(img, [1.0, 1.0, 20.0, 20.0]),
            }
            for c in (4, 20)
        )
    json_file = tmp_path_factory.mktemp("lvis_case") / "gt.json"
    json_file.write_text(json.dumps(gt))
    return LVIS(str(json_file)), gt, dets, str(json_file)


def _rect_rle(img, box):
    x, y, w, h = box
    rle = mask_util.frPyObjects(
        [[x, y, x + w, y, x + w, y + h, x, y + h]], img["height"], img["width"]
    )
    rle = mask_util.merge(rle)
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("utf-8")}


def _reference(lvis_api, dets, task, max_dets):
    with contextlib.redirect_stdout(io.StringIO()):
        return _evaluate_predictions_on_lvis(
            lvis_api, copy.deepcopy(dets), task, max_dets_per_image=max_dets
        )


def test_synthetic_case_covers_the_hard_parts(lvis_case):
    _, gt, dets, _ = lvis_case
    images_with_dets = {d["image_id"] for d in dets}
    assert any(img["id"] not in images_with_dets for img in gt["images"])  # empty predictions
    assert any(img["not_exhaustive_category_ids"] for img in gt["images"])
    assert any(img["neg_category_ids"] for img in gt["images"])
    scores = [d["score"] for d in dets]
    assert len(set(scores)) < len(scores) / 4  # many ties
    gt_cats = {a["category_id"] for a in gt["annotations"]}
    assert {"r", "c", "f"} == {c["frequency"] for c in gt["categories"] if c["id"] in gt_cats}
    assert (
        max(sum(1 for d in dets if d["image_id"] == i) for i in images_with_dets) > 7
    )  # max dets cuts


@pytest.mark.parametrize("task", ["bbox", "segm"])
@pytest.mark.parametrize("max_dets", [7, 300])
def test_faster_backend_equals_lvis_api(lvis_case, task, max_dets):
    lvis_api, gt, dets, _ = lvis_case
    reference = _reference(lvis_api, dets, task, max_dets)
    ours, per_class = evaluate_lvis(
        lvis_api, dets, task, max_dets_per_image=max_dets, backend="faster"
    )
    assert set(ours) == set(LVIS_METRICS)
    for key in LVIS_METRICS:
        assert ours[key] == pytest.approx(reference[key], abs=TOL), key
    assert 0 < ours["AP"] < 100 and ours["APr"] > 0  # a non-trivial case
    # Classes without ground truth have no AP; the others do.
    with_gt = {a["category_id"] for a in gt["annotations"]}
    assert {c for c, ap in per_class.items() if not math.isnan(ap)} == with_gt
    assert {4, 12, 20, 24}.isdisjoint(with_gt)


@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_both_backends_give_the_same_per_class_ap(lvis_case, task):
    lvis_api, _, dets, _ = lvis_case
    _, faster = evaluate_lvis(lvis_api, dets, task, max_dets_per_image=7, backend="faster")
    _, reference = evaluate_lvis(lvis_api, dets, task, max_dets_per_image=7, backend="lvis")
    assert faster.keys() == reference.keys()
    np.testing.assert_allclose(
        [faster[k] for k in sorted(faster)],
        [reference[k] for k in sorted(faster)],
        atol=TOL,
        equal_nan=True,
    )


def test_limit_dets_per_image_matches_lvis_results(lvis_case):
    from lvis import LVISResults

    lvis_api, _, dets, _ = lvis_case
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        reference = LVISResults(lvis_api, copy.deepcopy(boxes_only), max_dets=7).dataset[
            "annotations"
        ]
    ours = limit_dets_per_image(boxes_only, 7)
    assert [(d["image_id"], d["category_id"], d["score"], d["bbox"]) for d in ours] == [
        (d["image_id"], d["category_id"], d["score"], d["bbox"]) for d in reference
    ]


def test_no_predictions_gives_nan_like_detectron2(lvis_case):
    lvis_api = lvis_case[0]
    ours, per_class = evaluate_lvis(lvis_api, [], "bbox")
    reference = _evaluate_predictions_on_lvis(lvis_api, [], "bbox")
    assert all(math.isnan(ours[k]) and math.isnan(reference[k]) for k in LVIS_METRICS)
    assert per_class == {}


@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_only_unjudged_detections(lvis_case, task):
    """Every detection is of a category neither annotated nor negative in its image: all dropped."""
    lvis_api, gt, dets, _ = lvis_case
    judged = {img["id"]: set(img["neg_category_ids"]) for img in gt["images"]}
    for a in gt["annotations"]:
        judged[a["image_id"]].add(a["category_id"])
    unjudged = [d for d in dets if d["category_id"] not in judged[d["image_id"]]]
    assert unjudged
    reference = _reference(lvis_api, unjudged, task, -1)
    ours, _ = evaluate_lvis(lvis_api, unjudged, task, max_dets_per_image=-1)
    for key in LVIS_METRICS:
        assert ours[key] == pytest.approx(reference[key], abs=TOL), key
    assert ours["AP"] == 0.0


def test_bad_inputs_name_the_problem(lvis_case):
    lvis_api, gt, dets, _ = lvis_case
    with pytest.raises(ValueError, match="backend"):
        evaluate_lvis(lvis_api, dets, "bbox", backend="fast")
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_lvis(lvis_api, [dict(dets[0], image_id=10**6)], "bbox")
    from drcl2.evaluation.lvis_evaluation import faster_lvis_ground_truth

    flagged = copy.deepcopy(gt)
    flagged["annotations"][1]["ignore"] = 1
    with pytest.raises(ValueError, match="LVIS_BACKEND 'lvis'"):
        faster_lvis_ground_truth(flagged, source="x.json")
    no_freq = copy.deepcopy(gt)
    del no_freq["categories"][2]["frequency"]
    with pytest.raises(ValueError, match="frequency"):
        faster_lvis_ground_truth(no_freq, source="x.json")


# ------------------------------------------------------------------------------------------------
# The evaluator: a case with known per-class AP, through process() / evaluate().
# ------------------------------------------------------------------------------------------------
def _known_ap_dataset(tmp_path):
    """
    Two 64x64 images, four classes (dataset ids 10, 20, 30, 40):
      10 "apple"  (f): one instance, detected exactly                        -> AP 100
      20 "banjo"  (c): one instance; a false positive scores above the hit   -> AP 50
      30 "cactus" (r): one instance, never detected                          -> AP 0
      40 "drum"   (r): no ground truth (a negative category of image 1)      -> no AP
    """

    def rect(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    gt = {
        "images": [
            {
                "id": 1,
                "width": 64,
                "height": 64,
                "neg_category_ids": [40],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 2,
                "width": 64,
                "height": 64,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 10,
                "bbox": [4, 4, 20, 20],
                "area": 400,
                "segmentation": rect(4, 4, 20, 20),
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 20,
                "bbox": [30, 30, 24, 16],
                "area": 384,
                "segmentation": rect(30, 30, 24, 16),
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 30,
                "bbox": [10, 10, 30, 30],
                "area": 900,
                "segmentation": rect(10, 10, 30, 30),
            },
        ],
        "categories": [
            {"id": 10, "name": "apple", "frequency": "f"},
            {"id": 20, "name": "banjo", "frequency": "c"},
            {"id": 30, "name": "cactus", "frequency": "r"},
            {"id": 40, "name": "drum", "frequency": "r"},
        ],
    }
    json_file = tmp_path / "known_ap.json"
    json_file.write_text(json.dumps(gt))
    return str(json_file)


def _instances(boxes_xyxy, scores, classes, size=(64, 64)):
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros((len(scores),) + size, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes_xyxy):
        masks[k, int(y0) : int(y1), int(x0) : int(x1)] = True
    inst.pred_masks = masks
    return inst


@pytest.fixture
def known_ap_dataset(tmp_path):
    name = f"drcl2_test_known_ap_{os.getpid()}_{tmp_path.name}"
    MetadataCatalog.get(name).set(
        json_file=_known_ap_dataset(tmp_path),
        evaluator_type="lvis",
        thing_classes=["apple", "banjo", "cactus", "drum"],
        thing_dataset_id_to_contiguous_id={10: 0, 20: 1, 30: 2, 40: 3},
        class_image_count=[
            {"id": 10, "image_count": 500},
            {"id": 20, "image_count": 42},
            {"id": 30, "image_count": 3},
            {"id": 40, "image_count": 1},
        ],
        class_frequency=["f", "c", "r", "r"],
    )
    yield name
    MetadataCatalog.remove(name)


def _run_evaluator(name, output_dir, backend):
    evaluator = LVISEvaluator(name, distributed=False, output_dir=output_dir, backend=backend)
    evaluator.reset()
    # Image 1: apple hit (score .9); banjo: a miss at .8 above the hit at .7; a drum false positive.
    evaluator.process(
        [{"image_id": 1}],
        [
            {
                "instances": _instances(
                    [[4, 4, 24, 24], [0, 0, 10, 10], [30, 30, 54, 46], [40, 2, 60, 20]],
                    [0.9, 0.8, 0.7, 0.6],
                    [0, 1, 1, 3],
                )
            }
        ],
    )
    evaluator.process([{"image_id": 2}], [{"instances": _instances([], [], [])}])  # no prediction
    return evaluator.evaluate()


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_evaluator_writes_known_per_class_ap(known_ap_dataset, tmp_path, backend):
    out = tmp_path / "inference"
    results = _run_evaluator(known_ap_dataset, str(out), backend)
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(50.0, abs=TOL)  # mean of 100, 50, 0
        assert results[task]["APf"] == pytest.approx(100.0, abs=TOL)
        assert results[task]["APc"] == pytest.approx(50.0, abs=TOL)
        assert results[task]["APr"] == pytest.approx(0.0, abs=TOL)
    with open(out / "per_class_ap.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == [
        "class",
        "frequency_group",
        "train_image_count",
        "ap_box",
        "ap_mask",
    ]
    table = {r["class"]: r for r in rows}
    assert [r["class"] for r in rows] == ["apple", "banjo", "cactus", "drum"]
    assert (table["apple"]["frequency_group"], table["apple"]["train_image_count"]) == ("f", "500")
    assert (table["banjo"]["frequency_group"], table["banjo"]["train_image_count"]) == ("c", "42")
    for column in ("ap_box", "ap_mask"):
        assert float(table["apple"][column]) == pytest.approx(100.0, abs=TOL)
        assert float(table["banjo"][column]) == pytest.approx(50.0, abs=TOL)
        assert float(table["cactus"][column]) == pytest.approx(0.0, abs=TOL)
        assert table["drum"][column] == ""  # no ground truth: AP undefined
    png = (out / "per_class_ap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Image 2 has no detection (an empty pred_masks): its saved predictions score the same again.
    again = LVISEvaluator(known_ap_dataset, distributed=False, backend=backend).evaluate_file(
        str(out / "instances_predictions.pth")
    )
    assert again == results


def test_evaluator_rejects_unknown_backend(known_ap_dataset):
    with pytest.raises(ValueError, match="LVIS_BACKEND"):
        LVISEvaluator(known_ap_dataset, backend="pycocotools")


def test_evaluator_backends_agree_on_generated_set(lvis_case, tmp_path):
    """The evaluator class (not only evaluate_lvis) with both backends, from detectron2-style
    outputs."""
    lvis_api, gt, dets, json_file = lvis_case
    name = f"drcl2_test_lvis_case_{os.getpid()}"
    ids = sorted(c["id"] for c in gt["categories"])
    MetadataCatalog.get(name).set(
        json_file=json_file,
        thing_classes=[f"class_{i}" for i in ids],
        thing_dataset_id_to_contiguous_id={i: k for k, i in enumerate(ids)},
    )
    try:
        contiguous = {i: k for k, i in enumerate(ids)}
        predictions = {}
        for d in dets:
            predictions.setdefault(d["image_id"], []).append(
                dict(d, category_id=contiguous[d["category_id"]])
            )
        results = {}
        for backend in ("faster", "lvis"):
            evaluator = LVISEvaluator(
                name,
                distributed=False,
                output_dir=str(tmp_path / backend),
                backend=backend,
                max_dets_per_image=7,
            )
            evaluator.reset()
            evaluator._predictions = [
                {"image_id": i, "instances": copy.deepcopy(p)} for i, p in predictions.items()
            ]
            with contextlib.redirect_stdout(io.StringIO()):
                results[backend] = evaluator.evaluate()
        for task in ("bbox", "segm"):
            for key in LVIS_METRICS:
                assert results["faster"][task][key] == pytest.approx(
                    results["lvis"][task][key], abs=TOL
                )
        with open(tmp_path / "faster" / "per_class_ap.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(ids)
        # No class_frequency / class_image_count in this metadata: groups and training image counts
        # come from the json's categories (LVIS files carry the training counts in val files too).
        assert [r["frequency_group"] for r in rows] == [c["frequency"] for c in gt["categories"]]
        assert [int(r["train_image_count"]) for r in rows] == [
            c["image_count"] for c in gt["categories"]
        ]
    finally:
        MetadataCatalog.remove(name)


def test_metrics_are_logged_not_printed_by_faster_backend(lvis_case, caplog):
    lvis_api, _, dets, _ = lvis_case
    out = io.StringIO()
    with contextlib.redirect_stdout(out), caplog.at_level(logging.INFO):
        evaluate_lvis(lvis_api, dets, "bbox", backend="faster")
    assert out.getvalue() == ""


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_trainer_builds_lvis_evaluator_with_configured_backend(known_ap_dataset, tmp_path, backend):
    from detectron2.config import get_cfg

    from drcl2 import Trainer, add_drcl2_config

    cfg = get_cfg()
    add_drcl2_config(cfg)
    assert cfg.TEST.DRCL2.LVIS_BACKEND == "faster"  # the default
    cfg.TEST.DRCL2.LVIS_BACKEND = backend
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = Trainer.build_evaluator(cfg, known_ap_dataset)
    assert isinstance(evaluator, LVISEvaluator)
    assert evaluator._backend == backend and evaluator._max_dets_per_image == 300
    assert evaluator._output_dir == os.path.join(str(tmp_path), "inference")
