#!/usr/bin/env python
"""drcl_d2: long-tailed detection pretraining (2DRCL, DetCo, MoCo v2) as a detectron2 add-on.

detectron2 is deliberately not listed in install_requires: it is installed from source (or by
scripts/setup_env.sh from the PyPI repackaging) and a user's own build must never be replaced.
"""
from setuptools import find_packages, setup

setup(
    name="drcl_d2",
    version="0.1.0",
    description="Dynamic Rebalancing Contrastive Learning (2DRCL), DetCo and MoCo v2 pretraining for detectron2",
    packages=find_packages(exclude=("tests", "benchmarks", "configs")),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "pillow",
        "lvis",
        "pycocotools",
        "fvcore",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "submitit>=1.5"],  # the tests run the SLURM launcher locally
        "slurm": ["submitit>=1.5"],  # python -m drcl_d2.tools.submit
    },
    entry_points={
        "console_scripts": [
            "drcl-convert=drcl_d2.checkpoint.convert:main",
            "drcl-make-dataset=drcl_d2.data.synthetic:main",
            "drcl-check-dataset=drcl_d2.tools.check_dataset:main",
        ]
    },
)
