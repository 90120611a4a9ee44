"""The study runner (python -m drcl2.tools.study): study files, dry run, report maths, resume."""

import json
import os
import shutil
import textwrap

import pytest
from helpers import REPO_ROOT, STUDIES

from drcl2.study import StudyFileError, load_study
from drcl2.study.report import mean_std, paired_differences, read_csv, write_report
from drcl2.tools import study as study_tool

FINETUNE = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_finetune.yaml")
PRETRAIN = os.path.join(REPO_ROOT, "configs/toy/pretrain_2drcl.yaml")
SUPERVISED = os.path.join(REPO_ROOT, "configs/toy/mask_rcnn_supervised_pretrain.yaml")


def write_study(tmp_path, body, name="study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


BASIC = f"""
    name: t
    output_dir: {{out}}
    seeds: [1, 2]
    datasets: {{{{train: lvis_v1_toy_train, val: lvis_v1_toy_val, test: lvis_v1_toy_test}}}}
    schedule: {{{{P: 30, F: 20}}}}
    estimate_s_per_iter: {{{{pretrain: 2.0, finetune: 1.0}}}}
    arms:
      scratch:
        finetune: {{{{config: {FINETUNE}, iters: F}}}}
      scratch_long:
        finetune: {{{{config: {FINETUNE}, iters: F + P}}}}
      2drcl:
        pretrain: {{{{config: {PRETRAIN}, iters: P}}}}
        finetune: {{{{config: {FINETUNE}, iters: F}}}}
        compare_to: [scratch, scratch_long]
      abl:
        group: ablation
        seeds: [1]
        pretrain: {{{{config: {PRETRAIN}, iters: P, opts: [MODEL.DRCL2.AR.ENABLED, "False"]}}}}
        finetune: {{{{config: {FINETUNE}, iters: 7}}}}
"""


@pytest.mark.parametrize("path", STUDIES)
def test_shipped_study_files_parse(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from drcl2.config import add_drcl2_config
    from drcl2.engine.checks import check_drcl2_config
    from drcl2.study import StudyRunner

    study = load_study(path)
    if path in (
        "configs/study/toy.yaml",
        "configs/study/large.yaml",
    ):  # the main studies: main arms, 3 seeds
        assert {"scratch", "scratch_long", "supervised_pretrain", "2drcl"} <= set(study.arms)
        assert len(study.seeds) == 3
        assert study.arms["2drcl"].iters == study.arms["scratch_long"].iters  # equal compute
    num_classes = len(MetadataCatalog.get(study.datasets["train"]).thing_classes)
    runner = StudyRunner(study)
    for (
        arm
    ) in study.arms.values():  # every stage's config takes the study's and the arm's overrides
        for stage in arm.stages:
            cfg = get_cfg()
            add_drcl2_config(cfg)
            cfg.merge_from_file(stage.config)
            cfg.merge_from_list(
                runner.stage_opts(arm, arm.seeds[0], stage)
            )  # unknown keys fail here
            assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == num_classes, (arm.name, stage.config)
            assert cfg.SOLVER.MAX_ITER == stage.iters
            assert all(0 < s < stage.iters for s in cfg.SOLVER.STEPS)
            if cfg.MODEL.META_ARCHITECTURE == "DRCL2":
                check_drcl2_config(cfg)  # e.g. the DRB switch agrees with the sampler in every row


def test_study_file_parses(tmp_path):
    study = load_study(write_study(tmp_path, BASIC.format(out=tmp_path / "out")))
    assert list(study.arms) == ["scratch", "scratch_long", "2drcl", "abl"]
    assert study.arms["scratch_long"].finetune.iters == 50  # F + P
    assert study.arms["2drcl"].iters == 50  # equal compute with scratch_long
    assert study.arms["abl"].pretrain.opts == ("MODEL.DRCL2.AR.ENABLED", "False")
    assert study.arms["abl"].seeds == (1,) and study.arms["scratch"].seeds == (1, 2)
    assert study.jobs == 1 and study.num_gpus == 1 and study.device == "auto"
    # main group first, seed-major; the ablation after
    order = [(a.name, s) for a, s in study.runs()]
    assert order == [
        ("scratch", 1),
        ("scratch_long", 1),
        ("2drcl", 1),
        ("scratch", 2),
        ("scratch_long", 2),
        ("2drcl", 2),
        ("abl", 1),
    ]
    assert [(a.name, s) for a, s in study.runs(["2drcl"], [2])] == [("2drcl", 2)]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            ("      scratch:\n", "      scratch:\n        colour: red\n"),
            r"arms.scratch: unknown key\(s\) \['colour'\]",
        ),
        (
            (FINETUNE + ", iters: F}", "configs/toy/no_such.yaml, iters: F}"),
            r"arms.scratch.finetune.config: config file 'configs/toy/no_such.yaml' not found",
        ),
        (
            ("iters: F + P", "iters: F + Q"),
            r"arms.scratch_long.finetune.iters: 'Q' is neither a number nor a name in schedule",
        ),
        (
            ("compare_to: [scratch, scratch_long]", "compare_to: [scratch, nope]"),
            r"arms.2drcl.compare_to: 'nope' is not another arm",
        ),
        (("    seeds: [1, 2]\n", "    seeds: [1, 1]\n"), r"seeds: has repeated seeds"),
        (("    schedule:", "    shedule:"), r"\(top level\): unknown key\(s\) \['shedule'\]"),
    ],
)
def test_study_file_errors_name_the_key(tmp_path, change, message):
    body = BASIC.format(out=tmp_path / "out")
    assert change[0] in body
    path = write_study(tmp_path, body.replace(*change, 1))
    with pytest.raises(StudyFileError, match=message) as e:
        load_study(path)
    assert path in str(e.value)


def test_reused_pretraining_parts_and_val_only_studies(tmp_path):
    body = (
        BASIC.format(out=tmp_path / "out")
        + f"""
      2drcl_backbone:
        pretrain: {{from: 2drcl}}
        finetune: {{config: {FINETUNE}, iters: F, parts: [backbone, proposal_generator]}}
    """
    )
    study = load_study(write_study(tmp_path, body))
    arm = study.arms["2drcl_backbone"]
    assert arm.pretrain == study.arms["2drcl"].pretrain and arm.iters == 50
    assert arm.finetune.parts == ("backbone", "proposal_generator")
    # the pre-training folder is 2drcl's: it runs once for both arms
    assert study.stage_dir(arm, 1, arm.pretrain) == study.stage_dir(
        study.arms["2drcl"], 1, arm.pretrain
    )
    assert study.stage_dir(arm, 1, arm.finetune).endswith("2drcl_backbone/seed1/finetune")
    from drcl2.study import StudyRunner

    runner = StudyRunner(study)
    pending = runner.pending(study.runs(["2drcl", "2drcl_backbone"], [1]))
    assert [(a.name, st.kind) for a, _, st in pending] == [
        ("2drcl", "pretrain"),
        ("2drcl", "finetune"),
        ("2drcl_backbone", "finetune"),
    ]
    for bad, message in (
        (
            body.replace("from: 2drcl}", "from: scratch}"),
            "'scratch' is not an arm with its own pre-training",
        ),
        (
            body.replace(
                "parts: [backbone, proposal_generator]", "parts: [roi_heads.box_predictor]"
            ),
            "must list distinct parts",
        ),
        (
            body.replace(
                "        pretrain: {from: 2drcl}\n",
                "        seeds: [1, 3]\n        pretrain: {from: 2drcl}\n",
            ),
            r"arms.2drcl_backbone.seeds: seeds \[1, 3\] must be among those of '2drcl'",
        ),
    ):
        with pytest.raises(StudyFileError, match=message):
            load_study(write_study(tmp_path, bad, name="bad.yaml"))
    explore = load_study(
        write_study(tmp_path, body.replace(", test: lvis_v1_toy_test", ""), name="explore.yaml")
    )
    assert explore.splits == ("val",) and study.splits == ("val", "test")


def test_finetune_results_read_one_or_several_test_sets(tmp_path):
    from drcl2.study.runner import finetune_results

    datasets = {"train": "tr", "val": "v", "test": "te"}
    (tmp_path / "metrics.json").write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"iteration": 9, "total_loss": 1.0},
                {
                    "iteration": 9,
                    "v/bbox/AP": 1.0,
                    "v/bbox/APr": 2.0,
                    "te/bbox/AP": 3.0,
                    "te/segm/AP": 4.0,
                },
                {"iteration": 9, "data_time": 0.1},
            )
        )
    )
    assert finetune_results(str(tmp_path), datasets) == {
        "val": {"bbox": {"AP": 1.0, "APr": 2.0}},
        "test": {"bbox": {"AP": 3.0}, "segm": {"AP": 4.0}},
    }
    (tmp_path / "metrics.json").write_text(
        json.dumps({"iteration": 9, "bbox/AP": 5.0, "segm/APr": 6.0})
    )
    assert finetune_results(str(tmp_path), datasets, ("val",)) == {
        "val": {"bbox": {"AP": 5.0}, "segm": {"APr": 6.0}}
    }
    with pytest.raises(RuntimeError, match="no results for v in the last evaluation"):
        finetune_results(str(tmp_path), datasets)


def test_cli_dry_run_and_bad_arm(tmp_path, capsys):
    path = write_study(tmp_path, BASIC.format(out=tmp_path / "out"))
    assert study_tool.main(["--config-file", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[3/7] 2drcl seed 1: pre-train 30 it" in out and "-> fine-tune 20 it" in out
    assert "[7/7] abl seed 1" in out
    # 10 stages; estimate from estimate_s_per_iter (pre 2 s/it, fine 1 s/it)
    iters_pre, iters_ft = 30 * 3, 20 + 50 + 20 + 20 + 50 + 20 + 7
    assert f"10 of 10 stages to run, {iters_pre + iters_ft:,} iterations" in out
    assert f"estimated {(iters_pre * 2 + iters_ft) / 60:.1f} min" in out
    assert not os.path.exists(tmp_path / "out")  # a dry run trains (and writes) nothing
    assert study_tool.main(["--config-file", path, "--arms", "2drcl,nope", "--dry-run"]) == 2
    assert "--arms: 'nope' is not an arm" in capsys.readouterr().err


def _row(arm, seed, ap, apr, split="test", task="bbox"):
    return {
        "arm": arm,
        "group": "main",
        "seed": seed,
        "split": split,
        "task": task,
        "AP": ap,
        "AP50": ap,
        "AP75": ap,
        "APr": apr,
        "APc": ap,
        "APf": ap,
        "iters": 10,
        "wall_s": 60.0,
    }


def test_summary_maths_on_a_hand_made_csv(tmp_path):
    study = load_study(write_study(tmp_path, BASIC.format(out=tmp_path / "out")))
    rows = [_row("scratch", 1, 10.0, 4.0), _row("scratch", 2, 12.0, 6.0),
            _row("scratch_long", 1, 11.0, 5.0), _row("scratch_long", 2, 15.0, 5.0),
            _row("2drcl", 1, 13.0, 9.0), _row("2drcl", 2, 14.0, 8.0),
            _row("2drcl", 3, 50.0, 50.0),  # no scratch seed 3: left out of the pairs
            _row("2drcl", 1, 99.0, 99.0, split="val")]  # fmt: skip
    assert mean_std([10.0, 12.0]) == (11.0, pytest.approx(2**0.5), 2)
    assert mean_std([float("nan"), 3.0])[2] == 1
    assert paired_differences(rows, "2drcl", "scratch", "test", "bbox", "APr") == [5.0, 2.0]
    assert paired_differences(rows, "2drcl", "scratch_long", "test", "bbox", "AP") == [2.0, -1.0]
    per_class = [
        {
            "arm": a,
            "seed": s,
            "split": "test",
            "class": c,
            "frequency_group": g,
            "train_image_count": n,
            "ap_box": v,
            "ap_mask": "",
        }
        for a, v0 in (("2drcl", 30.0), ("scratch", 20.0), ("scratch_long", 25.0))
        for s in (1, 2)
        for c, g, n, v in (("a", "r", 3, v0), ("b", "f", 300, v0 + 10))
    ]
    paths = write_report(
        study, str(tmp_path / "report"), {"command": "cmd", "device": "dev"}, rows, per_class
    )
    text = open(paths["summary.md"]).read()
    assert "- `cmd` at commit ? on dev" in text  # a meta file of one bare invocation (older runner)
    # test box AP of 2drcl: seeds 1, 2, 3 -> mean 25.7, std 21.1
    assert "| 2drcl | main | 50 | 1, 2, 3 | 25.7 ± 21.1 |" in text
    # paired vs scratch: ΔAP = 3, 2 -> +2.5 ± 0.7; ΔAPr = 5, 2 -> +3.5 ± 2.1 (a gain beyond its std)
    assert "| 2drcl | scratch | 2 | +2.5 ± 0.7 | +3.5 ± 2.1 |" in text and "gain > std" in text
    # vs scratch_long: ΔAPr = 4, 3 -> +3.5 ± 0.7
    assert "| 2drcl | scratch_long | 2 | +0.5 ± 2.1 | +3.5 ± 0.7 |" in text
    assert "Val split" in text and "99.0" in text
    for name in ("groups.png", "per_class_delta.png"):
        assert open(paths[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the per-class delta is taken against the best baseline by mean test AP: scratch_long
    assert "minus its best baseline by mean test AP, scratch_long" in text
    assert [r["arm"] for r in read_csv(paths["results.csv"])] == [r["arm"] for r in rows]


# ------------------------------------------------------------------------------------------------
# end to end on a tiny generated set: run, skip when finished, resume when interrupted
# ------------------------------------------------------------------------------------------------
TINY = (
    '[MODEL.DEVICE, cpu, DATALOADER.NUM_WORKERS, "0", SOLVER.IMS_PER_BATCH, "2", '
    'INPUT.MIN_SIZE_TRAIN, "(64,)", INPUT.MAX_SIZE_TRAIN, "96", INPUT.MIN_SIZE_TEST, "64", '
    'INPUT.MAX_SIZE_TEST, "96", MODEL.RPN.POST_NMS_TOPK_TRAIN, "64", '
    'MODEL.RPN.POST_NMS_TOPK_TEST, "32", TEST.DETECTIONS_PER_IMAGE, "10"]'
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A small toy set (same classes and file layout) as the runs' $DETECTRON2_DATASETS."""
    from drcl2.data.generated import ToyLVISSpec, generate_toy_lvis

    root = str(tmp_path_factory.mktemp("tiny_toy"))
    generate_toy_lvis(root, ToyLVISSpec(num_train_images=24, num_val_images=6, num_test_images=6))
    return root


@pytest.mark.slow
def test_run_skip_resume_and_report(tmp_path, tiny_root, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_root)  # the runs' subprocesses read it
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    path = write_study(
        tmp_path,
        f"""
        name: tiny
        output_dir: {out}
        device: cpu
        jobs: 2  # two runs at a time, one thread each
        seeds: [5]
        checkpoint_period: 1
        datasets: {{train: lvis_v1_toy_train, val: lvis_v1_toy_val, test: lvis_v1_toy_test}}
        arms:
          scratch:
            finetune: {{config: {FINETUNE}, iters: 3, opts: {TINY}}}
          sup:
            pretrain: {{config: {SUPERVISED}, iters: 2, opts: {TINY}}}
            finetune: {{config: {FINETUNE}, iters: 2, opts: {TINY}}}
            compare_to: [scratch]
          sup_backbone:
            pretrain: {{from: sup}}
            finetune: {{config: {FINETUNE}, iters: 1, opts: {TINY}, parts: [backbone]}}
    """,
    )
    report = tmp_path / "report"
    args = ["--config-file", path, "--report-dir", str(report), "--keep-checkpoints"]
    assert study_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/3] scratch seed 5: fine-tune 3 it ... ETA" in printed
    assert (
        "[2/3] sup seed 5: pre-train 2 it" in printed
        and "[2/3] sup seed 5: fine-tune 2 it" in printed
    )
    assert (
        "[3/3] sup_backbone seed 5: fine-tune 1 it" in printed
        and "sup_backbone seed 5: pre-train" not in printed
    )
    assert "[3/3] sup_backbone seed 5: sup's pre-training -> fine-tune 1 it" in printed  # the plan
    ft = out / "scratch" / "seed5" / "finetune"
    record = json.load(open(ft / "study_stage.json"))
    assert record["iters"] == 3 and record["wall_s"] > 0
    assert (
        "--num-gpus" in record["command"]
        and record["command"][record["command"].index("SEED") + 1] == "5"
    )
    for split in ("val", "test"):
        assert 0 <= record["results"][split]["bbox"]["AP"] <= 100
    # both test sets evaluated, each into its own folder (nothing overwritten)
    for name in ("lvis_v1_toy_val", "lvis_v1_toy_test"):
        assert (ft / "inference" / name / "per_class_ap.csv").is_file()
    # the supervised pre-training was exported like 2DRCL's and fine-tuned from the export
    sup = out / "sup" / "seed5"
    assert (sup / "pretrain" / "model_final_finetune.pth").is_file()
    sup_cmd = json.load(open(sup / "finetune" / "study_stage.json"))["command"]
    assert sup_cmd[sup_cmd.index("MODEL.WEIGHTS") + 1] == str(
        sup / "pretrain" / "model_final_finetune.pth"
    )
    # a reused pre-training with some parts: only those parts are loaded
    import torch

    parts = torch.load(
        out / "sup_backbone" / "seed5" / "finetune" / "init_parts.pth", weights_only=False
    )["model"]
    assert parts and all(k.startswith("backbone.") for k in parts)
    assert not (out / "sup_backbone" / "seed5" / "pretrain").exists()
    rows = read_csv(report / "results.csv")
    assert {(r["arm"], r["split"], r["task"]) for r in rows} == {
        (a, s, t)
        for a in ("scratch", "sup", "sup_backbone")
        for s in ("val", "test")
        for t in ("bbox", "segm")
    }
    assert {r["iters"] for r in rows if r["arm"] == "sup"} == {"4"}
    for name in ("summary.md", "groups.png", "per_class_delta.png", "per_class.csv"):
        assert (report / name).is_file()
    assert "| sup | scratch | 1 |" in (report / "summary.md").read_text()

    # a second run skips everything that finished
    log_size = os.path.getsize(ft / "stdout.log")
    assert study_tool.main(args) == 0
    assert "fine-tune 3 it ..." not in capsys.readouterr().out
    assert os.path.getsize(ft / "stdout.log") == log_size

    # an interrupted stage (checkpoint of iteration 1 on disk, not finished) resumes from there
    os.remove(ft / "study_stage.json")
    os.remove(ft / "model_final.pth")
    (ft / "last_checkpoint").write_text("model_0000001.pth")
    assert study_tool.main(args) == 0
    log = open(ft / "stdout.log").read().split("$ ")[-1]
    assert "Starting training from iteration 2" in log
    assert len(json.load(open(ft / "study_attempts.json"))) == 2
    assert json.load(open(ft / "study_stage.json"))["wall_s"] > record["wall_s"]

    # --summarize rebuilds the report from the finished runs
    (report / "summary.md").unlink()
    assert study_tool.main(["--summarize", str(out), "--report-dir", str(report)]) == 0
    # every command that trained into the folder is named (the first run, the skip, the resume)
    meta = json.load(open(out / "tiny.study_meta.json"))["invocations"]
    assert len(meta) == 3 and all(
        m["command"].startswith("python -m drcl2.tools.study --config-file") for m in meta
    )
    assert (report / "summary.md").read_text().count(
        "- `python -m drcl2.tools.study --config-file"
    ) == 3
    # several studies sharing an output folder: --name picks one
    (out / "other.study.yaml").write_text(
        (out / "tiny.study.yaml").read_text().replace("name: tiny", "name: other")
    )
    assert study_tool.main(["--summarize", str(out)]) == 2
    assert "holds the studies ['other', 'tiny']: choose one with --name" in capsys.readouterr().err
    assert (
        study_tool.main(["--summarize", str(out), "--name", "tiny", "--report-dir", str(report)])
        == 0
    )
    # --probe: the exported weights of a seed, probed before fine-tuning, join the report
    assert study_tool.main(["--summarize", str(out), "--name", "tiny", "--report-dir", str(report),
                            "--probe", "5", "--probe-max-images", "4"]) == 0  # fmt: skip
    probe = {r["weights"]: r for r in read_csv(report / "probe.csv")}
    assert set(probe) == {"random", "sup"}  # scratch has no export; sup_backbone reuses sup's
    assert (
        float(probe["sup"]["res2_weight_change"])
        > 0
        == float(probe["random"]["res2_weight_change"])
    )
    assert "## Probe of the exported weights" in (report / "summary.md").read_text()

    # --records: the output folder is lost; the finished runs come back from the records, and
    # the one pre-training that an unfinished fine-tuning needs runs again (records keep no
    # checkpoint)
    records = tmp_path / "records"
    assert study_tool.main(["--summarize", str(out), "--name", "tiny", "--records", str(records),
                            "--report-dir", str(report)]) == 0  # fmt: skip
    shutil.rmtree(out)
    shutil.rmtree(records / "sup_backbone")
    assert study_tool.main(args + ["--records", str(records)]) == 0
    printed = capsys.readouterr().out
    assert "records of scratch seed 1, sup seed 1 restored from" not in printed  # seed 5
    assert f"records of scratch seed 5, sup seed 5 restored from {records}" in printed
    # sup's or sup_backbone's thread, whichever comes first, runs the shared pre-training again
    assert f"seed 5: the pre-train record in {out / 'sup' / 'seed5' / 'pretrain'}" in printed
    assert "came without its export (records keep no checkpoint): running it again" in printed
    assert "scratch seed 5: fine-tune 3 it ..." not in printed
    assert f"records of sup_backbone seed 5 kept in {records}" in printed
    assert (records / "sup_backbone" / "seed5" / "finetune" / "study_stage.json").is_file()


def test_summarize_prints_a_committed_study_beside_a_run(tmp_path, capsys):
    """What `make demo` prints under its AP table: the committed study's means for its arms."""
    from drcl2.study.report import RESULT_COLUMNS, write_csv
    from drcl2.tools.summarize import print_study_means

    rows = [_row("scratch", 1, 10.0, 4.0, split="val"), _row("scratch", 2, 12.0, 6.0, split="val"),
            _row("2drcl", 1, 13.0, 9.0, split="val"), _row("2drcl", 1, 7.0, 2.0)]  # fmt: skip
    write_csv(str(tmp_path / "results.csv"), rows, RESULT_COLUMNS)
    print_study_means(str(tmp_path / "results.csv"), ["scratch", "2drcl", "absent"])
    out = capsys.readouterr().out
    val, test = out.split("test split")
    assert "| scratch | 10 " in val and "11.00 ± 1.41" in val  # AP over seeds 1, 2
    assert "| 2drcl   | 10 " in val and "13.00" in val
    assert "7.00" in test and "scratch" not in test and "absent" not in out
    print_study_means(str(tmp_path / "none.csv"), ["scratch"])
    assert "run `make study`" in capsys.readouterr().out

    # `make demo`: the run's table, then each --study with the --arms after it
    from drcl2.tools.summarize import main as summarize

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"iteration": 9, "bbox/AP": 5.0}) + "\n")
    main_csv = tmp_path / "main" / "results.csv"
    main_csv.parent.mkdir()
    write_csv(str(main_csv), [_row("init", 1, 70.0, 60.0)], RESULT_COLUMNS)
    summarize([str(run), "--study", str(tmp_path / "results.csv"), "--arms", "2drcl",
               "--study", str(main_csv), "--arms", "init,scratch"])  # fmt: skip
    out = capsys.readouterr().out
    first, second = out.split(str(main_csv))
    assert "| 2drcl " in first and "| init " not in first
    assert "| init " in second and "70.00" in second and "2drcl" not in second
    with pytest.raises(SystemExit):
        summarize([str(run), "--study", str(main_csv)])
    assert "give each --study its --arms (1 --study, 0 --arms)" in capsys.readouterr().err


@pytest.mark.slow
def test_source_weights_train_once_and_keep_only_the_resnet(
    tmp_path, tiny_root, monkeypatch, capsys
):
    """`source_weights`: a detector trained on its own set, evaluated there, its ResNet kept for the
    `weights: source` stages; trained once, reported with its accuracy and cost."""
    import torch

    monkeypatch.setenv("DETECTRON2_DATASETS", tiny_root)
    monkeypatch.chdir(REPO_ROOT)
    # the shipped source config on the tiny toy set (it stands in for the source set here)
    source_cfg = tmp_path / "source.yaml"
    source_cfg.write_text(
        textwrap.dedent(f"""
        _BASE_: {REPO_ROOT}/configs/toy/mask_rcnn_source.yaml
        MODEL:
          ROI_HEADS: {{NUM_CLASSES: 30}}
          RPN: {{POST_NMS_TOPK_TRAIN: 64, POST_NMS_TOPK_TEST: 32}}
        DATASETS:
          TRAIN: ("lvis_v1_toy_train",)
          TEST: ("lvis_v1_toy_val",)
        DATALOADER: {{NUM_WORKERS: 0}}
        INPUT:
          MIN_SIZE_TRAIN: (64,)
          MAX_SIZE_TRAIN: 96
          MIN_SIZE_TEST: 64
          MAX_SIZE_TEST: 96
        TEST: {{DETECTIONS_PER_IMAGE: 10}}
        SOLVER: {{IMS_PER_BATCH: 2}}
    """)
    )
    out = tmp_path / "out"
    weights = out / "source" / "r18.pth"
    path = write_study(
        tmp_path,
        f"""
        name: src
        output_dir: {out}
        device: cpu
        seeds: [3]
        checkpoint_period: 100
        datasets: {{train: lvis_v1_toy_train, val: lvis_v1_toy_val, test: lvis_v1_toy_test}}
        source_weights: {{config: {source_cfg}, output: {weights}, iters: 3}}
        arms:
          init:
            finetune: {{config: {FINETUNE}, iters: 1, opts: {TINY}, weights: source}}
    """,
    )
    report = tmp_path / "report"
    assert study_tool.main(["--config-file", path, "--report-dir", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "first: source weights (3 it" in printed and "source weights ready in" in printed
    record = json.load(open(out / "source" / "source.json"))
    assert record["iters"] == 3 and record["wall_s"] > 0 and record["dataset"] == "lvis_v1_toy_val"
    assert 0 <= record["results"]["bbox"]["AP"] <= 100 and "AP" in record["results"]["segm"]
    cmd = record["command"]
    assert cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "3"
    assert (
        cmd[cmd.index("SOLVER.STEPS") + 1] == "(2,)"
    )  # 4560 / 6000 and 5520 / 6000 of 3 iterations
    # the ResNet of the trained detector, nothing else, bit for bit
    trained = torch.load(out / "source" / "r18_train" / "model_final.pth", weights_only=False)[
        "model"
    ]
    kept = torch.load(weights, weights_only=False)["model"]
    assert kept and set(kept) == {k for k in trained if k.startswith("backbone.bottom_up.")}
    assert all(torch.equal(kept[k], trained[k]) for k in kept)
    init_cmd = json.load(open(out / "init" / "seed3" / "finetune" / "study_stage.json"))["command"]
    assert init_cmd[init_cmd.index("MODEL.WEIGHTS") + 1] == str(weights)
    assert "- source initialisation: `" in (report / "summary.md").read_text()
    # a second study run does not train the source again
    log = out / "source" / "r18_train" / "stdout.log"
    size = os.path.getsize(log)
    assert study_tool.main(["--config-file", path, "--report-dir", str(report)]) == 0
    assert os.path.getsize(log) == size and "source weights:" not in capsys.readouterr().out
