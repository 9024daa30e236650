"""drcl_d2: a detectron2 add-on for long-tailed detection pretraining and fine-tuning.

Importing the package registers its samplers, meta-architectures and dataset helpers with
detectron2's registries, as detectron2 projects do.
"""
from . import compat  # noqa: F401  (NumPy 2 fix for lvis 0.5.3 must come before lvis is used)
from . import modeling  # noqa: F401  (registers the pretraining meta-architectures)
from .config import add_drcl_config

__all__ = ["add_drcl_config"]
__version__ = "0.1.0"
