"""
Generators of the demo, study and test sets — not part of the data path (drcl2.data reads whatever
LVIS-format set it is given; nothing here runs while training on real data):

    toy_lvis         the generated LVIS-format detection sets: lvis_v1_toy (demo, tests, studies) and
                     lvis_v1_gen_large (GPU runs), from a ToyLVISSpec (datasets/prepare_toy_lvis.py)
    toy_classes      their class vocabulary: coloured, patterned shapes and how each is drawn
    toy_source       the toy source classification set, the stand-in for ImageNet
                     (datasets/prepare_toy_source.py)
    synthetic_lvis   LVIS-like ground truth, detections and JPEGs for the evaluator and pipeline tests
                     and benchmarks

drcl2.data.datasets registers the generated sets (lvis_v1_toy_*, lvis_v1_gen_large_*, toy_source_*);
each is generated on first use.
"""
from .toy_lvis import LVIS_GEN_LARGE, ToyLVISSpec, ensure_toy_lvis, generate_toy_lvis
from .toy_source import ToySourceSpec, ensure_toy_source, generate_toy_source

__all__ = [
    "ToyLVISSpec",
    "LVIS_GEN_LARGE",
    "generate_toy_lvis",
    "ensure_toy_lvis",
    "ToySourceSpec",
    "generate_toy_source",
    "ensure_toy_source",
]
