"""
Generators of the demo, study and test sets — not part of the data path (drcl2.data reads whatever
LVIS-format set it is given; nothing here runs while training on real data):

    toy_lvis         the generated LVIS-format detection sets, each from a ToyLVISSpec
                     (datasets/prepare_toy_lvis.py): lvis_v1_toy (demo, tests, studies),
                     lvis_v1_toy_source (the source set, the toy stand-in for ImageNet) and
                     lvis_v1_gen_large (GPU runs)
    toy_classes      their class vocabulary: coloured, patterned shapes and how each is drawn
    synthetic_lvis   LVIS-like ground truth, detections and JPEGs for the evaluator and pipeline
                     tests
                     and benchmarks

drcl2.data.datasets registers the generated sets (lvis_v1_toy_*, lvis_v1_toy_source_*,
lvis_v1_gen_large_*);
each is generated on first use.
"""

from .toy_lvis import LVIS_GEN_LARGE, TOY_SOURCE, ToyLVISSpec, ensure_toy_lvis, generate_toy_lvis

__all__ = [
    "ToyLVISSpec",
    "LVIS_GEN_LARGE",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "TOY_SOURCE",
]
