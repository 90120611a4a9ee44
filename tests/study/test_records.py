"""A study's records (drcl2/study/records.py): finished runs kept apart from the output folder,
restored after it is lost, never overwritten; the runner re-runs a restored pre-training that an
unfinished fine-tuning needs."""

import json
import os
import shutil
import textwrap

from helpers import REPO_ROOT

from drcl2.study import StudyRunner, load_study
from drcl2.study.records import sync_records
from drcl2.study.report import read_csv
from drcl2.tools import study as study_tool

FINETUNE = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
SUPERVISED = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_supervised_pretrain.yaml")
DATASETS = {"val": "lvis_v1_toy_val", "test": "lvis_v1_toy_test"}


def make_study(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: rec
        output_dir: {tmp_path / "out"}
        seeds: [1]
        datasets: {{train: lvis_v1_toy_train, val: lvis_v1_toy_val, test: lvis_v1_toy_test}}
        arms:
          scratch:
            finetune: {{config: {FINETUNE}, iters: 3}}
          sup:
            pretrain: {{config: {SUPERVISED}, iters: 2}}
            finetune: {{config: {FINETUNE}, iters: 2}}
            compare_to: [scratch]
          sup_backbone:
            pretrain: {{from: sup}}
            finetune: {{config: {FINETUNE}, iters: 1, parts: [backbone]}}
    """)
    )
    study = load_study(str(path))
    os.makedirs(study.output_dir)
    shutil.copyfile(path, os.path.join(study.output_dir, "rec.study.yaml"))  # as the runner does
    return study


def finish(study, arm_name, ap, export=True):
    """Fabricate the files the runner leaves in a finished run's stage folders."""
    arm = study.arms[arm_name]
    for stage in arm.stages:
        folder = study.stage_dir(arm, 1, stage)
        os.makedirs(folder, exist_ok=True)
        record = {"arm": arm_name, "seed": 1, "stage": stage.kind, "wall_s": 10.0}
        if stage.kind == "finetune":
            metrics = {"AP": ap, "AP50": 0, "AP75": 0, "APr": ap / 2, "APc": 0, "APf": 0}
            record["results"] = {s: {"bbox": dict(metrics)} for s in DATASETS}
            for name in DATASETS.values():
                os.makedirs(os.path.join(folder, "inference", name))
                with open(os.path.join(folder, "inference", name, "per_class_ap.csv"), "w") as f:
                    f.write("category_id,name,frequency,ap_box,ap_mask\n1,a,r,0.5,0.4\n")
        else:
            with open(os.path.join(folder, "metrics.json"), "w") as f:
                for it, probe in ((0, 0.1), (1, 0.3)):
                    f.write(json.dumps({"iteration": it, "health/probe_roi": probe}) + "\n")
                f.write(json.dumps({"iteration": 1, "total_loss": 2.0}) + "\n")
            if export:
                open(os.path.join(folder, "model_final_finetune.pth"), "wb").close()
        with open(os.path.join(folder, "study_stage.json"), "w") as f:
            json.dump(record, f)
        with open(os.path.join(folder, "study_attempts.json"), "w") as f:
            json.dump([10.0], f)


def test_records_survive_a_lost_output_folder(tmp_path):
    study = make_study(tmp_path)
    records = str(tmp_path / "records")
    finish(study, "scratch", 20.0)
    finish(study, "sup", 30.0)
    with open(os.path.join(study.output_dir, "rec.study_meta.json"), "w") as f:
        json.dump({"invocations": [{"command": "first"}]}, f)

    assert sync_records(study, records) == (["scratch seed 1", "sup seed 1"], [])
    kept = os.path.join(records, "sup", "seed1")
    assert json.load(open(os.path.join(kept, "pretrain", "health.json"))) == {
        "iteration": 1,
        "health/probe_roi": 0.3,
    }  # the last health figures, not the first
    assert os.path.isfile(
        os.path.join(kept, "finetune/inference/lvis_v1_toy_test/per_class_ap.csv")
    )
    assert not any(
        f.endswith(".pth") or f == "metrics.json" for _, _, fs in os.walk(records) for f in fs
    )
    assert sync_records(study, records) == ([], [])  # nothing new

    # the machine is reset: the output folder is gone; the report is rebuilt from the records
    shutil.rmtree(study.output_dir)
    report = tmp_path / "report"
    argv = ["--summarize", study.output_dir, "--records", records, "--report-dir", str(report)]
    assert study_tool.main(argv) == 0
    rows = read_csv(report / "results.csv")
    assert {(r["arm"], r["split"], float(r["AP"])) for r in rows} == {
        (arm, split, ap) for arm, ap in (("scratch", 20.0), ("sup", 30.0)) for split in DATASETS
    }
    assert len(read_csv(report / "per_class.csv")) == 4
    assert "- `first` at commit" in (report / "summary.md").read_text()

    # the runner skips the restored runs; sup's pre-training runs again (no export in the records)
    # because sup_backbone, unfinished, starts from it
    runner = StudyRunner(study, records_dir=records)
    pending = runner.pending(study.runs())
    assert [(a.name, s.kind) for a, _, s in pending] == [
        ("sup", "pretrain"),
        ("sup_backbone", "finetune"),
    ]
    assert runner.pending(study.runs(["scratch", "sup"])) == []  # nothing needs that export

    # never overwritten, either way: a record that differs is left as it is
    record = os.path.join(study.output_dir, "scratch", "seed1", "finetune", "study_stage.json")
    with open(record, "w") as f:
        f.write("{}")
    sync_records(study, records)
    kept_record = os.path.join(records, "scratch", "seed1", "finetune", "study_stage.json")
    assert json.load(open(kept_record))["results"]["val"]["bbox"]["AP"] == 20.0
    assert open(record).read() == "{}"

    # commands from both machines are listed, the kept ones first
    with open(os.path.join(study.output_dir, "rec.study_meta.json"), "w") as f:
        json.dump({"invocations": [{"command": "first"}, {"command": "second"}]}, f)
    sync_records(study, records)
    meta = json.load(open(os.path.join(records, "rec.study_meta.json")))
    assert [m["command"] for m in meta["invocations"]] == ["first", "second"]
