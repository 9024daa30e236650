"""Pretraining meta-architectures, registered in detectron2's META_ARCH_REGISTRY on import."""
from . import detco  # noqa: F401
from . import drcl  # noqa: F401
