"""
drcl2's benchmarks, each printing a table (device, sizes, repeats and the figures):

    python -m drcl2.tools.benchmark sampler      # dynamic rebalancing sampler vs detectron2's RFS
    python -m drcl2.tools.benchmark step ...     # DRCL2 training step vs supervised Mask R-CNN
    python -m drcl2.tools.benchmark lvis_eval    # LVIS evaluation: faster-coco-eval vs lvis API
    python -m drcl2.tools.benchmark mapper       # two-view data pipeline vs detectron2's
                                                 DatasetMapper
    python -m drcl2.tools.benchmark padding      # padding of the views' batches per aspect-ratio
                                                 grouping rule

Each benchmark lives in its own module ``drcl2.tools.bench_<name>`` with two functions,
``add_arguments(parser)`` and ``run(args)``.
"""

import argparse
import importlib

BENCHMARKS = {
    "sampler": "drcl2.tools.bench_sampler",
    "step": "drcl2.tools.bench_step",
    "lvis_eval": "drcl2.tools.bench_lvis_eval",
    "mapper": "drcl2.tools.bench_mapper",
    "padding": "drcl2.tools.bench_padding",
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m drcl2.tools.benchmark",
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
