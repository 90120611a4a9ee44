#!/usr/bin/env python
"""drcl2: 2DRCL pre-training for long-tailed object detection, as a detectron2 plugin.

detectron2 itself is deliberately not listed in ``install_requires``: its authors do not publish it
on PyPI. Install it first (see README.md), or let ``make install`` do it.
"""

from setuptools import find_packages, setup

setup(
    name="drcl2",
    version="0.1.0",
    description="2DRCL (Dynamic Rebalancing Contrastive Learning with Dual Reconstruction) "
    "pre-training for long-tailed object detection, on detectron2",
    packages=find_packages(include=["drcl2", "drcl2.*"]),
    python_requires=">=3.9",
    install_requires=[
        # detectron2 imports these but its PyPI copy does not declare them.
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        # detectron2 needs numpy < 2.
        "numpy>=1.23,<2",
        # lvis requires opencv-python (not -headless); opencv >= 4.12 needs numpy >= 2.
        "opencv-python>=4.5,<4.12",
        "pycocotools>=2.0.2",
        "lvis>=0.5.3",
        "faster-coco-eval>=1.6",
        # LVISEvaluator writes lvis_instances_results.json with it (10x json's speed).
        "orjson>=3.9",
        "matplotlib",
        "Pillow",
        "tabulate",
        # python -m drcl2.tools.submit: train_net.py on SLURM, requeued and resumed on preemption.
        "submitit>=1.5,<2",
    ],
    # the test suite and the style tool (configured in pyproject.toml; `make test` runs both)
    extras_require={"test": ["pytest>=7", "ruff==0.17.6"]},
)
