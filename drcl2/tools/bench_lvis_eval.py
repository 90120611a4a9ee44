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

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    parser.add_argument("--num-images", type=int, default=2000, help="images in the generated set")
    parser.add_argument("--dets-per-image", type=int, default=300, help="detections per image")
    parser.add_argument("--max-dets", type=int, default=300, help="max_dets_per_image of the evaluators")
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each path (the best is kept)")
    parser.add_argument("--seed", type=int, default=0)


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

    from drcl2.evaluation import evaluate_lvis, patch_lvis_numpy
    from drcl2.evaluation.lvis_evaluation import LVIS_METRICS, faster_lvis_ground_truth
    from drcl2.evaluation.synthetic import (
        lvis_v1_categories,
        synthetic_lvis_detections,
        synthetic_lvis_gt,
    )

    setup_logger(name="drcl2")
    logging.getLogger("drcl2.evaluation").setLevel(logging.INFO)  # not faster-coco-eval's debug lines
    logging.getLogger("lvis").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    patch_lvis_numpy()

    start = time.perf_counter()
    cats = lvis_v1_categories()
    gt = synthetic_lvis_gt(
        args.num_images, cats, seed=args.seed, image_size=(320, 640), max_categories_per_image=8,
        max_instances_per_category=4, num_negative_categories=8,
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
        f"device: CPU, {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"torch threads={torch.get_num_threads()}; best of {args.repeats} run(s)"
    )

    def reference():
        return {t: _evaluate_predictions_on_lvis(lvis_api, copy.deepcopy(dets), t, max_dets_per_image=args.max_dets)
                for t in args.tasks}

    def ours():
        faster_gt = faster_lvis_ground_truth(lvis_api.dataset)
        return {t: evaluate_lvis(lvis_api, dets, t, max_dets_per_image=args.max_dets, backend="faster",
                                 faster_gt=faster_gt)[0]
                for t in args.tasks}

    t_ours, cpu_ours, m_ours = _timed(ours, args.repeats)
    t_ref, cpu_ref, m_ref = _timed(reference, args.repeats)

    header = f"{'path':<10} {'task':<5} " + " ".join(f"{k:>8}" for k in LVIS_METRICS)
    print(header)
    for name, metrics in (("lvis API", m_ref), ("faster", m_ours)):
        for task in args.tasks:
            print(f"{name:<10} {task:<5} " + " ".join(f"{metrics[task][k]:8.4f}" for k in LVIS_METRICS))
    diff = max(abs(m_ref[t][k] - m_ours[t][k]) for t in args.tasks for k in LVIS_METRICS)
    print(f"max |difference| over all keys: {diff:.2e} (AP points)")
    print(f"{'path':<10} {'wall s':>9} {'CPU s':>9}")
    print(f"{'lvis API':<10} {t_ref:9.2f} {cpu_ref:9.2f}")
    print(f"{'faster':<10} {t_ours:9.2f} {cpu_ours:9.2f}")
    print(
        f"speed-up (lvis API / faster): {t_ref / t_ours:.2f}x wall, {cpu_ref / cpu_ours:.2f}x CPU  "
        f"[tasks: {' + '.join(args.tasks)}]"
    )
    return {"lvis_seconds": t_ref, "faster_seconds": t_ours, "lvis_cpu_seconds": cpu_ref,
            "faster_cpu_seconds": cpu_ours, "max_diff": diff}
