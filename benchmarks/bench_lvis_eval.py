"""LVIS evaluation: drcl2's faster-coco-eval backend vs detectron2's stock lvis-API path.

Generates an LVIS-v1-style validation set (the 1,203 LVIS v1 categories with their r/c/f groups,
federated neg / not-exhaustive lists, polygon masks) and detectron2-style detections (300 per image
by default, RLE masks), then times, in one process and on the same inputs, "detections -> metrics
dict" for

    lvis API : detectron2.evaluation.lvis_evaluation._evaluate_predictions_on_lvis (what
               detectron2's LVISEvaluator runs: LVISResults + LVISEval, pure Python)
    faster   : drcl2.evaluation.evaluate_lvis(..., backend="faster") (what drcl2's LVISEvaluator
               runs; the time includes building its ground-truth index once)

Loading the ground-truth json and generating the data are not timed. Prints both metric dicts, the
largest difference, wall-clock and CPU seconds (CPU time is the fairer figure on a shared machine)
and the speed-ups.

End to end (``--e2e``, on by default): the two evaluator classes as a Trainer runs them, each with
an output folder: ``process()`` of every image's model output (``Instances`` with boxes, scores,
classes and full-image bool masks, decoded from the generated detections; the decoding is not timed,
the two evaluators' ``process`` calls alternate image by image) and then ``evaluate()`` (predictions
file, ``lvis_instances_results.json``, scoring, and for drcl2 the per-class report):

    detectron2 : detectron2.evaluation.LVISEvaluator (per-mask RLE encoding, torch.save of the list
                 of dicts, json.dumps, the lvis API)
    drcl2      : drcl2.evaluation.LVISEvaluator (columns, box-cropped RLE encoding, columnar
                 predictions file, orjson, faster-coco-eval)

Target: drcl2 end to end >= 5x faster than detectron2's in CPU seconds (this process, all its
threads: work moved to another thread still counts), with the same metrics; wall-clock seconds are
printed beside them. The default run (2,000 images, both comparisons) takes about 15 minutes on 2
CPU cores, most of it detectron2's ``process()``; ``--num-images 600`` about 4, ``--no-e2e`` skips
the end-to-end part.
"""

import contextlib
import copy
import io
import json
import logging
import os
import platform
import tempfile
import time

import torch
from verdict import shown, verdict

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    parser.add_argument("--num-images", type=int, default=2000, help="images in the generated set")
    parser.add_argument("--dets-per-image", type=int, default=300, help="detections per image")
    parser.add_argument(
        "--max-dets", type=int, default=300, help="max_dets_per_image of the evaluators"
    )
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each path (the best is kept)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-e2e",
        dest="e2e",
        action="store_false",
        help="skip the end-to-end run (process + evaluate of both evaluator classes)",
    )
    parser.add_argument(
        "--no-eval-only",
        dest="eval_only",
        action="store_false",
        help="skip the evaluate-only comparison (lvis API vs faster)",
    )


E2E_TARGET = 5.0


def _timed(fn, repeats):
    """Best wall-clock and CPU (this process, all threads) seconds over ``repeats`` runs."""
    best_wall, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # lvis prints its summary table
            out = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, out


def run(args):
    from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis
    from detectron2.utils.logger import setup_logger
    from lvis import LVIS

    from drcl2.data.generated.synthetic_lvis import (
        lvis_v1_categories,
        synthetic_lvis_detections,
        synthetic_lvis_gt,
    )
    from drcl2.evaluation import evaluate_lvis, patch_lvis_numpy
    from drcl2.evaluation.lvis_evaluation import LVIS_METRICS, faster_lvis_ground_truth

    setup_logger(name="drcl2")
    logging.getLogger("drcl2.evaluation").setLevel(
        logging.INFO
    )  # not faster-coco-eval's debug lines
    logging.getLogger("lvis").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    patch_lvis_numpy()

    start = time.perf_counter()
    cats = lvis_v1_categories()
    gt = synthetic_lvis_gt(
        args.num_images,
        cats,
        seed=args.seed,
        image_size=(320, 640),
        max_categories_per_image=8,
        max_instances_per_category=4,
        num_negative_categories=8,
    )
    dets = synthetic_lvis_detections(
        gt, dets_per_image=args.dets_per_image, seed=args.seed + 1, with_masks="segm" in args.tasks
    )
    with tempfile.TemporaryDirectory() as tmp:
        json_file = os.path.join(tmp, "lvis_v1_synthetic_val.json")
        with open(json_file, "w") as f:
            json.dump(gt, f)
        lvis_api = LVIS(json_file)
    print(
        f"generated in {time.perf_counter() - start:.1f} s: {len(gt['images'])} images, "
        f"{len(gt['categories'])} categories, {len(gt['annotations'])} ground-truth instances, "
        f"{len(dets)} detections ({args.dets_per_image}/image, max_dets_per_image={args.max_dets})"
    )
    print(
        f"device: CPU, {platform.processor() or platform.machine()}, "
        f"os.cpu_count()={os.cpu_count()}, torch threads={torch.get_num_threads()}; best of "
        f"{args.repeats} run(s)"
    )

    def reference():
        return {
            t: _evaluate_predictions_on_lvis(
                lvis_api, copy.deepcopy(dets), t, max_dets_per_image=args.max_dets
            )
            for t in args.tasks
        }

    def ours():
        faster_gt = faster_lvis_ground_truth(lvis_api.dataset)
        return {
            t: evaluate_lvis(
                lvis_api,
                dets,
                t,
                max_dets_per_image=args.max_dets,
                backend="faster",
                faster_gt=faster_gt,
            )[0]
            for t in args.tasks
        }

    out = {}
    if args.eval_only:
        t_ours, cpu_ours, m_ours = _timed(ours, args.repeats)
        t_ref, cpu_ref, m_ref = _timed(reference, args.repeats)

        print("\nevaluate only (detections -> metrics):")
        header = f"{'path':<10} {'task':<5} " + " ".join(f"{k:>8}" for k in LVIS_METRICS)
        print(header)
        for name, metrics in (("lvis API", m_ref), ("faster", m_ours)):
            for task in args.tasks:
                print(
                    f"{name:<10} {task:<5} "
                    + " ".join(f"{metrics[task][k]:8.4f}" for k in LVIS_METRICS)
                )
        diff = max(abs(m_ref[t][k] - m_ours[t][k]) for t in args.tasks for k in LVIS_METRICS)
        print(f"max |difference| over all keys: {diff:.2e} (AP points)")
        print(f"{'path':<10} {'wall s':>9} {'CPU s':>9}")
        print(f"{'lvis API':<10} {t_ref:9.2f} {cpu_ref:9.2f}")
        print(f"{'faster':<10} {t_ours:9.2f} {cpu_ours:9.2f}")
        print(
            f"speed-up (lvis API / faster): {t_ref / t_ours:.2f}x wall, {cpu_ref / cpu_ours:.2f}x "
            f"CPU  [tasks: {' + '.join(args.tasks)}]"
        )
        out.update(
            {
                "lvis_seconds": t_ref,
                "faster_seconds": t_ours,
                "lvis_cpu_seconds": cpu_ref,
                "faster_cpu_seconds": cpu_ours,
                "max_diff": diff,
            }
        )
    if args.e2e:
        out["e2e"] = _end_to_end(args, gt, dets, json_file_content=gt)
        if args.eval_only:
            e2e = out["e2e"]
            print("\nsummary (speed-up of drcl2 over detectron2 / the lvis API):")
            print(
                f"  evaluate only : {out['lvis_seconds'] / out['faster_seconds']:.2f}x wall, "
                f"{out['lvis_cpu_seconds'] / out['faster_cpu_seconds']:.2f}x CPU"
            )
            print(
                f"  end to end    : {e2e['wall_speedup']:.2f}x wall, {shown(e2e['speedup'])}x CPU  "
                f"(target >= {E2E_TARGET:.1f}x in CPU seconds: {e2e['verdict']})"
            )
    return out


def _end_to_end(args, gt, dets, json_file_content):
    """process + evaluate of detectron2's and drcl2's LVISEvaluator, each with an output folder."""
    import gc
    import shutil

    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import LVISEvaluator as D2LVISEvaluator

    from drcl2.data.generated.synthetic_lvis import synthetic_model_outputs
    from drcl2.evaluation import LVISEvaluator
    from drcl2.evaluation.lvis_evaluation import LVIS_METRICS

    tmp = tempfile.mkdtemp(prefix="drcl2_bench_lvis_e2e_")
    name = f"drcl2_bench_lvis_e2e_{os.getpid()}"
    try:
        json_file = os.path.join(tmp, "lvis_v1_synthetic_val.json")
        with open(json_file, "w") as f:
            json.dump(json_file_content, f)
        MetadataCatalog.get(name).set(json_file=json_file, evaluator_type="lvis")
        with_masks = "segm" in args.tasks
        evaluators = {
            "detectron2": D2LVISEvaluator(
                name,
                tasks=tuple(args.tasks),
                distributed=False,
                output_dir=os.path.join(tmp, "detectron2"),
                max_dets_per_image=args.max_dets,
            ),
            "drcl2": LVISEvaluator(
                name,
                tasks=tuple(args.tasks),
                distributed=False,
                output_dir=os.path.join(tmp, "drcl2"),
                max_dets_per_image=args.max_dets,
            ),
        }
        wall = {k: {"process": 0.0, "evaluate": 0.0} for k in evaluators}
        cpu = {k: {"process": 0.0, "evaluate": 0.0} for k in evaluators}
        for e in evaluators.values():
            e.reset()
        names = list(evaluators)
        for k, (inputs, outputs) in enumerate(synthetic_model_outputs(gt, dets, with_masks)):
            for n in names if k % 2 == 0 else names[::-1]:
                t, c = time.perf_counter(), time.process_time()
                evaluators[n].process(inputs, outputs)
                wall[n]["process"] += time.perf_counter() - t
                cpu[n]["process"] += time.process_time() - c
            del inputs, outputs
        results = {}
        for n in names:
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                results[n] = evaluators[n].evaluate()
            wall[n]["evaluate"] = time.perf_counter() - t
            cpu[n]["evaluate"] = time.process_time() - c
        sizes = {
            n: {
                f: os.path.getsize(os.path.join(tmp, n, f)) / 2**20
                for f in ("instances_predictions.pth", "lvis_instances_results.json")
            }
            for n in names
        }
    finally:
        MetadataCatalog.remove(name)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nend to end: process() of {len(gt['images'])} model outputs + evaluate(), each "
        f"evaluator with an output folder (tasks: {' + '.join(args.tasks)})"
    )
    header = f"{'evaluator':<11} {'task':<5} " + " ".join(f"{k:>8}" for k in LVIS_METRICS)
    print(header)
    for n in names:
        for task in args.tasks:
            print(
                f"{n:<11} {task:<5} "
                + " ".join(f"{results[n][task][k]:8.4f}" for k in LVIS_METRICS)
            )
    diff = max(
        abs(results["detectron2"][t][k] - results["drcl2"][t][k])
        for t in args.tasks
        for k in LVIS_METRICS
    )
    print(f"max |difference| over all keys: {diff:.2e} (AP points)")
    print(
        f"{'evaluator':<11} {'process':>17} {'evaluate':>17} {'total':>17} {'.pth MiB':>9} "
        f"{'json MiB':>9}"
    )
    print(f"{'':<11} " + " ".join(f"{'wall s':>8} {'CPU s':>8}" for _ in range(3)))
    totals = {n: wall[n]["process"] + wall[n]["evaluate"] for n in names}
    cpu_totals = {n: cpu[n]["process"] + cpu[n]["evaluate"] for n in names}
    for n in names:
        print(
            f"{n:<11} {wall[n]['process']:8.2f} {cpu[n]['process']:8.2f} "
            f"{wall[n]['evaluate']:8.2f} {cpu[n]['evaluate']:8.2f} {totals[n]:8.2f} "
            f"{cpu_totals[n]:8.2f} {sizes[n]['instances_predictions.pth']:9.1f} "
            f"{sizes[n]['lvis_instances_results.json']:9.1f}"
        )
    speedup = cpu_totals["detectron2"] / cpu_totals["drcl2"]
    wall_speedup = totals["detectron2"] / totals["drcl2"]
    judged = verdict(speedup, E2E_TARGET, at_least=True)
    print(
        f"speed-up end to end (detectron2 / drcl2): {shown(speedup)}x CPU, "
        f"{wall_speedup:.2f}x wall; "
        f"process {cpu['detectron2']['process'] / cpu['drcl2']['process']:.2f}x CPU, evaluate "
        f"{cpu['detectron2']['evaluate'] / cpu['drcl2']['evaluate']:.2f}x CPU; target >= "
        f"{E2E_TARGET:.1f}x in CPU seconds: {judged}"
    )
    print(
        f"load average during the run (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    return {
        "wall": wall,
        "cpu": cpu,
        "speedup": speedup,
        "wall_speedup": wall_speedup,
        "verdict": judged,
        "max_diff": diff,
    }
