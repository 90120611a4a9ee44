"""
Columnar predictions of drcl2's LVISEvaluator: the box-cropped RLE encoder is byte-identical to
pycocotools, the columns give back detectron2's instances_to_coco_json exactly, the files hold what
detectron2's evaluator writes, and the metrics are detectron2's.
"""

import contextlib
import io
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator as D2LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, Instances

from drcl2.data.generated.synthetic_lvis import synthetic_lvis_detections, synthetic_lvis_gt
from drcl2.evaluation import LVISEvaluator, load_predictions, patch_lvis_numpy
from drcl2.evaluation.lvis_evaluation import LVIS_METRICS
from drcl2.evaluation.predictions import (
    columns_from_coco_json,
    columns_to_coco_json,
    encode_masks,
    instances_to_columns,
    save_predictions,
)


def _pycocotools(masks):
    return [
        mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]["counts"]
        for m in masks
    ]


def test_encode_masks_is_pycocotools_on_edge_cases():
    h, w = 37, 53
    m = np.zeros((10, h, w), bool)
    m[1, 3:10, 4:20] = True  # inside its box
    m[2] = True  # everything
    m[3, :, 0] = True  # first column, full height
    m[3, 5, w - 1] = True  # and the last pixel column
    m[4, 0, 0] = True  # the first pixel
    m[5, h - 1, w - 1] = True  # the last pixel
    m[6] = np.random.default_rng(0).random((h, w)) > 0.5  # noise
    m[7, 10:20, 30:40] = True
    m[7, 0, 2] = True  # a pixel far outside its box
    m[8, 2:5, :] = True  # full-width band
    # m[0] stays empty
    boxes = np.array(
        [
            [0, 0, 1, 1],
            [4, 3, 20, 10],
            [0, 0, w, h],
            [0, 0, w, h],
            [0, 0, 1, 1],
            [w - 1, h - 1, w, h],
            [0, 0, w, h],
            [30, 10, 40, 20],
            [0, 2, w, 5],
            [0, 0, 0, 0],
        ],
        float,
    )
    ref = _pycocotools(m)
    assert encode_masks(m, boxes) == ref
    assert encode_masks(m) == ref
    assert encode_masks(torch.from_numpy(m), torch.from_numpy(boxes)) == ref
    assert encode_masks(m.astype(np.uint8), boxes) == ref
    wrong = np.tile([[w, h, w, h]], (10, 1)).astype(float)  # boxes that miss every pixel
    assert encode_masks(m, wrong) == ref
    nan = boxes.copy()
    nan[3] = np.nan
    assert encode_masks(m, nan) == ref
    assert encode_masks(np.zeros((0, h, w), bool)) == []


def test_encode_masks_is_pycocotools_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(1, 12))
        h, w = (int(v) for v in rng.integers(1, 45, 2))
        masks = np.zeros((n, h, w), bool)
        boxes = []
        for i in range(n):
            x0, x1 = sorted(rng.integers(0, w + 1, 2))
            y0, y1 = sorted(rng.integers(0, h + 1, 2))
            masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > rng.random()
            boxes.append(
                [
                    x0 + rng.normal(0, 1.5),
                    y0 + rng.normal(0, 1.5),
                    x1 + rng.normal(0, 1.5),
                    y1 + rng.normal(0, 1.5),
                ]
            )
        assert encode_masks(masks, np.array(boxes)) == _pycocotools(masks)


def _outputs(seed=0, n=40, size=(60, 80)):
    rng = np.random.default_rng(seed)
    h, w = size
    inst = Instances(size)
    xy = rng.uniform(0, [w - 5, h - 5], (n, 2))
    wh = rng.uniform(1, [w / 2, h / 2], (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(rng.uniform(0, 1, n), dtype=torch.float32)
    inst.pred_classes = torch.tensor(rng.integers(0, 5, n), dtype=torch.int64)
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        region = masks[k, y0 : y1 + 1, x0 : x1 + 1]
        region[...] = torch.from_numpy(rng.random(tuple(region.shape)) > 0.3)
    inst.pred_masks = masks
    return inst


def test_columns_give_back_detectron2s_coco_json():
    inst = _outputs()
    ref = instances_to_coco_json(inst, 7)
    columns = instances_to_columns(inst)
    assert columns_to_coco_json(columns, 7) == ref
    assert json.dumps(columns_to_coco_json(columns, 7)) == json.dumps(
        ref
    )  # key order and floats too
    back = columns_from_coco_json(ref)
    assert columns_to_coco_json(back, 7) == ref
    inst.remove("pred_masks")
    assert columns_to_coco_json(instances_to_columns(inst), 7) == instances_to_coco_json(inst, 7)
    empty = Instances(
        (5, 5),
        pred_boxes=Boxes(torch.zeros(0, 4)),
        scores=torch.zeros(0),
        pred_classes=torch.zeros(0, dtype=torch.int64),
        pred_masks=torch.zeros(0, 5, 5, dtype=torch.bool),
    )
    assert columns_to_coco_json(instances_to_columns(empty), 1) == []


@pytest.fixture
def generated_lvis(tmp_path):
    """A generated LVIS-style set (5 categories) registered under a fresh name; (name, gt,
    outputs)."""
    cats = [
        {"id": i + 1, "name": f"c{i + 1}", "frequency": "rcf"[i % 3], "image_count": 3}
        for i in range(5)
    ]
    gt = synthetic_lvis_gt(8, cats, seed=5, image_size=(40, 90))
    dets = synthetic_lvis_detections(gt, dets_per_image=30, seed=6)
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    name = f"drcl2_test_predictions_{os.getpid()}_{tmp_path.name}"
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="lvis")
    from drcl2.data.generated.synthetic_lvis import synthetic_model_outputs

    yield name, gt, list(synthetic_model_outputs(gt, dets, with_masks=True))
    MetadataCatalog.remove(name)


def test_evaluator_writes_detectron2s_files_and_metrics(generated_lvis, tmp_path):
    name, gt, outputs = generated_lvis
    patch_lvis_numpy()  # the lvis API of detectron2's evaluator uses np.float
    results = {}
    for key, cls in (("detectron2", D2LVISEvaluator), ("drcl2", LVISEvaluator)):
        e = cls(name, distributed=False, output_dir=str(tmp_path / key), max_dets_per_image=300)
        e.reset()
        for inputs, outs in outputs:
            e.process(inputs, outs)
        with contextlib.redirect_stdout(io.StringIO()):
            results[key] = e.evaluate()
    for task in ("bbox", "segm"):
        for k in LVIS_METRICS:
            assert results["drcl2"][task][k] == pytest.approx(
                results["detectron2"][task][k], abs=1e-4
            )
    with open(tmp_path / "detectron2" / "lvis_instances_results.json") as f:
        ref = json.load(f)
    with open(tmp_path / "drcl2" / "lvis_instances_results.json") as f:
        ours = json.load(f)
    assert ours == ref and len(ref) > 100
    ref_pth = torch.load(tmp_path / "detectron2" / "instances_predictions.pth", weights_only=False)
    ours_pth = load_predictions(str(tmp_path / "drcl2" / "instances_predictions.pth"))
    assert ours_pth == ref_pth
    # plain torch.load (weights_only) reads drcl2's file too: a dict of tensors
    raw = torch.load(tmp_path / "drcl2" / "instances_predictions.pth")
    assert raw["format"] == "drcl2.columnar_predictions.v1" and raw["boxes"].shape[1] == 4
    # load_predictions also reads detectron2's own file
    assert load_predictions(str(tmp_path / "detectron2" / "instances_predictions.pth")) == ref_pth


def _without_detections(outputs, which):
    """Empty the instances of images ``which`` as detectron2 does for an image with no detection:
    every field kept, ``pred_masks`` included (shape [0, H, W])."""
    for k in which:
        out = outputs[k][1][0]
        out["instances"] = out["instances"][:0]
        assert out["instances"].pred_masks.shape[0] == 0
    return [outputs[k][0][0]["image_id"] for k in which]


def _evaluate_file(name, path, output_dir):
    """A fresh evaluator's metrics on a saved predictions file."""
    return LVISEvaluator(name, distributed=False, output_dir=output_dir).evaluate_file(path)


@pytest.mark.parametrize("writer", ["drcl2", "detectron2"])
def test_saved_predictions_with_empty_images_give_the_live_metrics(
    generated_lvis, tmp_path, writer
):
    """
    Images without detection (the first one among them) have an empty ``pred_masks``; their saved
    form has no masks. Evaluated again from drcl2's or detectron2's ``instances_predictions.pth``,
    they count as images without detections, and the metrics are exactly the live ones.
    """
    name, gt, outputs = generated_lvis
    empty = _without_detections(outputs, (0, 3))
    patch_lvis_numpy()  # the lvis API of detectron2's evaluator uses np.float
    cls = LVISEvaluator if writer == "drcl2" else D2LVISEvaluator
    live = cls(name, distributed=False, output_dir=str(tmp_path / "live"))
    live.reset()
    for inputs, outs in outputs:
        live.process(inputs, outs)
    with contextlib.redirect_stdout(io.StringIO()):
        live_results = live.evaluate()
    path = str(tmp_path / "live" / "instances_predictions.pth")
    saved = {p["image_id"]: p["instances"] for p in load_predictions(path)}
    assert all(saved[i] == [] for i in empty) and len(saved) == len(outputs)
    if writer == "detectron2":  # the live reference is drcl2's own evaluator
        live = LVISEvaluator(name, distributed=False)
        live.reset()
        for inputs, outs in outputs:
            live.process(inputs, outs)
        live_results = live.evaluate()
    assert set(live_results) == {"bbox", "segm"}
    again = _evaluate_file(name, path, str(tmp_path / "again"))
    assert again == live_results
    # in the folder it reads from: the file is left as it was, the report is written again
    before = (tmp_path / "live" / "instances_predictions.pth").read_bytes()
    assert _evaluate_file(name, path, str(tmp_path / "live")) == live_results
    assert (tmp_path / "live" / "instances_predictions.pth").read_bytes() == before
    assert (tmp_path / "again" / "per_class_ap.csv").read_text() == (
        tmp_path / "live" / "per_class_ap.csv"
    ).read_text()


def test_saved_predictions_still_refuse_detections_without_masks(generated_lvis, tmp_path):
    """Only images without detections are exempt: a file where an image with detections has no
    masks while others have them is refused (either format), and so is a boxes-only file when the
    tasks ask for masks."""
    name, gt, outputs = generated_lvis
    _without_detections(outputs, (0,))
    e = LVISEvaluator(name, distributed=False, output_dir=str(tmp_path / "live"))
    e.reset()
    for inputs, outs in outputs:
        e.process(inputs, outs)
    e.evaluate()
    predictions = load_predictions(str(tmp_path / "live" / "instances_predictions.pth"))
    assert predictions[0]["instances"] == [] and predictions[2]["instances"]
    for d in predictions[2]["instances"]:
        del d["segmentation"]
    torch.save(predictions, tmp_path / "detectron2.pth")
    save_predictions(
        [dict(p, instances=columns_from_coco_json(p["instances"])) for p in predictions],
        str(tmp_path / "drcl2.pth"),
    )
    with_masks, without = predictions[1]["image_id"], predictions[2]["image_id"]
    for path in (tmp_path / "detectron2.pth", tmp_path / "drcl2.pth"):
        with pytest.raises(
            ValueError, match=rf"masks for image {with_masks} but not for image {without}\."
        ):
            _evaluate_file(name, str(path), None)
    # boxes only: evaluated as boxes (the empty first image changes nothing), refused for segm
    boxes_only = [
        dict(
            p,
            instances=[{k: v for k, v in d.items() if k != "segmentation"} for d in p["instances"]],
        )
        for p in predictions
    ]
    torch.save(boxes_only, tmp_path / "boxes.pth")
    assert set(_evaluate_file(name, str(tmp_path / "boxes.pth"), None)) == {"bbox"}
    e = LVISEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    with pytest.raises(ValueError, match=rf"tasks include 'segm'.*no masks \(image {with_masks}\)"):
        e.evaluate_file(str(tmp_path / "boxes.pth"))


def test_live_images_without_detections_need_no_masks(generated_lvis):
    """A model that leaves ``pred_masks`` out for an image without detections (detectron2 gives an
    empty one) is not refused, and scores as if it had given the empty masks."""
    name, gt, outputs = generated_lvis
    _without_detections(outputs, (0, 3))
    results = []
    for drop in (False, True):
        if drop:
            for k in (0, 3):
                outputs[k][1][0]["instances"].remove("pred_masks")
        e = LVISEvaluator(name, distributed=False, tasks=("bbox", "segm") if drop else None)
        e.reset()
        for inputs, outs in outputs:
            e.process(inputs, outs)
        results.append(e.evaluate())
    assert set(results[0]) == {"bbox", "segm"} and results[1] == results[0]


def test_masks_for_some_images_only_are_refused_at_the_first_such_image(generated_lvis, tmp_path):
    name, gt, outputs = generated_lvis
    (in0, out0), (in1, out1), (in2, out2) = outputs[:3]
    out1[0]["instances"].remove("pred_masks")
    e = LVISEvaluator(name, distributed=False, output_dir=str(tmp_path))
    e.reset()
    e.process(in0, out0)
    with pytest.raises(
        ValueError,
        match=rf"'pred_masks' for image {in0[0]['image_id']} "
        rf"but not for image {in1[0]['image_id']}",
    ):
        e.process(in1, out1)
    # tasks that ask for masks: the first image without them is refused
    e = LVISEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    e.reset()
    with pytest.raises(ValueError, match=rf"tasks include 'segm'.*image {in1[0]['image_id']}"):
        e.process(in1, out1)
    # predictions gathered from processes that disagree: refused before any file or score
    a, b = (
        LVISEvaluator(name, distributed=False),
        LVISEvaluator(name, distributed=False, output_dir=str(tmp_path / "b")),
    )
    a.reset(), b.reset()
    a.process(in1, out1)
    b.process(in2, out2)
    b._predictions = a._predictions + b._predictions
    with pytest.raises(ValueError, match="masks for image .* but not for image"):
        b.evaluate()
    assert not os.path.exists(tmp_path / "b" / "lvis_instances_results.json")


@pytest.mark.slow
def test_lvis_benchmark_end_to_end_verdict(capsys, benchmarks):
    """`benchmark lvis_eval` at a tiny size (not a timed test): both figures are printed and the
    end-to-end verdict says ok exactly when the measured speed-up in CPU seconds reaches the
    target."""
    import re

    benchmark = benchmarks("benchmark")
    benchmark.main(["lvis_eval", "--num-images", "6", "--dets-per-image", "20"])
    out = capsys.readouterr().out
    assert "evaluate only" in out and "end to end" in out
    m = re.search(
        r"speed-up end to end \(detectron2 / drcl2\): ([0-9.]+)x CPU, [0-9.]+x wall.*"
        r"target >= ([0-9.]+)x in CPU seconds: (ok|MISSED)",
        out,
    )
    assert m, out
    assert m.group(3) == ("ok" if float(m.group(1)) >= float(m.group(2)) else "MISSED")
    diff = float(re.findall(r"max \|difference\| over all keys: ([0-9.e+-]+)", out)[-1])
    assert diff < 1e-4
