"""Pretraining meta-architectures (META_ARCH_REGISTRY) and the long-tail RoI heads (ROI_HEADS_REGISTRY),
registered in detectron2's registries on import."""
from . import box_predictor  # noqa: F401
from . import detco  # noqa: F401
from . import drcl  # noqa: F401
