"""
`train_net.py --eval-only` on the demo set writes the per-class report (CSV and PNG), and the
predictions file it writes scores the same again (LVISEvaluator.evaluate_file).
"""

import csv
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from helpers import REPO_ROOT, cfg_from

import train_net

CONFIG = os.path.join("configs", "toy", "mask_rcnn_finetune.yaml")


def _eval_only_opts(name, output_dir):
    return [
        "DATASETS.TEST", f"('{name}',)",
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", "0",
        # An untrained head scores every class about equally: keep inference cheap on 2 cores.
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "20",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def _eval_only(name, output_dir):
    """``train_net.py --eval-only`` of a freshly initialised model; its results."""
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO_ROOT, CONFIG), "--eval-only"]
        + _eval_only_opts(name, output_dir)
    )
    return train_net.main(args)


def test_eval_only_writes_per_class_report(tmp_path, toy_val_mini):
    """A freshly initialised R-18 Mask R-CNN (MODEL.WEIGHTS "") on demo val images: poor but
    real."""
    name = toy_val_mini
    results = _eval_only(name, tmp_path)
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


def test_eval_only_predictions_with_an_empty_image_score_the_same_again(
    tmp_path, toy_val_mini, monkeypatch
):
    """
    The model gives no detection for the first image (an empty Instances, its pred_masks [0, H,
    W], as detectron2 gives it); the instances_predictions.pth that --eval-only writes, evaluated
    again by the evaluator the Trainer builds, gives exactly the same results.
    """
    from drcl2 import Trainer
    from drcl2.evaluation import load_predictions

    name = toy_val_mini
    first = DatasetCatalog.get(name)[0]["image_id"]
    build_model = Trainer.build_model

    def build_model_without_detections_for_the_first_image(cls, cfg):
        model = build_model(cfg)
        forward = model.forward

        def forward_(batched_inputs):
            outputs = forward(batched_inputs)
            for inputs, output in zip(batched_inputs, outputs):
                if not model.training and inputs["image_id"] == first:
                    output["instances"] = output["instances"][:0]
                    assert output["instances"].pred_masks.shape[0] == 0
            return outputs

        model.forward = forward_
        return model

    monkeypatch.setattr(
        Trainer, "build_model", classmethod(build_model_without_detections_for_the_first_image)
    )
    results = _eval_only(name, tmp_path)
    assert set(results) == {"bbox", "segm"}
    path = tmp_path / "inference" / "instances_predictions.pth"
    saved = {p["image_id"]: p["instances"] for p in load_predictions(str(path))}
    assert saved[first] == [] and all(saved[i] for i in saved if i != first)

    cfg = cfg_from(CONFIG, *_eval_only_opts(name, tmp_path))
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path / "again"))
    assert evaluator.evaluate_file(str(path)) == results
