"""
drcl2's benchmarks, each printing a table (device, sizes, repeats and the figures):

    python benchmarks/benchmark.py sampler      # dynamic rebalancing sampler vs detectron2's RFS
    python benchmarks/benchmark.py step ...     # DRCL2 training step vs supervised Mask R-CNN
    python benchmarks/benchmark.py lvis_eval    # LVIS evaluation: faster-coco-eval vs lvis API
    python benchmarks/benchmark.py mapper       # two-view data pipeline vs detectron2's
                                                 DatasetMapper
    python benchmarks/benchmark.py padding      # padding of the views' batches per aspect-ratio
                                                 grouping rule

Each benchmark lives in its own script beside this one, ``bench_<name>.py``, with two functions,
``add_arguments(parser)`` and ``run(args)``; ``verdict.py`` judges a figure against its target on
the figure as the table prints it. The benchmarks are scripts of the repository, not part
of the installed package: run them from the repository root.
"""

import argparse
import importlib

BENCHMARKS = {
    "sampler": "bench_sampler",
    "step": "bench_step",
    "lvis_eval": "bench_lvis_eval",
    "mapper": "bench_mapper",
    "padding": "bench_padding",
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/benchmark.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(
            name, help=(modules[name].__doc__ or "").strip().splitlines()[0]
        )
        modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    modules[args.benchmark].run(args)


if __name__ == "__main__":
    main()
