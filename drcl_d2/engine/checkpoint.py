"""Checkpoints that a crash cannot corrupt, and loads that say how much of the model they set."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from detectron2.checkpoint import DetectionCheckpointer

from drcl_d2.utils import atomic_write

__all__ = ["AtomicDetectionCheckpointer", "LoadSummary", "atomic_torch_save", "atomic_write_text",
           "quiet_checkpoint_logs", "require_backbone_loaded", "MIN_BACKBONE_FRACTION"]

# MODEL.WEIGHTS must initialise at least this fraction of the backbone's weights (by element count)
# unless MODEL.ALLOW_PARTIAL_WEIGHTS: an ImageNet R-50 sets 88% of an R50-FPN backbone (all but the
# FPN), a converted pretraining checkpoint all of it, an R-18 file in an R-50 model about a third.
MIN_BACKBONE_FRACTION = 0.5

# What drcl_d2.utils.atomic_write leaves behind when the process dies mid-write: ".<target>.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def quiet_checkpoint_logs():
    """Silence fvcore's and detectron2's load messages: for a caller that reports
    what a load set in its own words (drcl-convert, the figures)."""
    loggers = [logging.getLogger(n) for n in ("fvcore.common.checkpoint", "detectron2.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


@dataclass
class LoadSummary:
    """How much of a model one checkpoint initialised (tensors of its state_dict, and elements)."""

    path: str
    loaded: int
    total: int
    backbone_loaded: int
    backbone_total: int
    backbone_elements_loaded: int
    backbone_elements: int
    incorrect_shapes: list = field(default_factory=list)  # (key, shape in file, shape in model)
    unused: int = 0  # tensors of the file the model has no place for

    @property
    def backbone_fraction(self) -> float:
        return self.backbone_elements_loaded / self.backbone_elements if self.backbone_elements else 1.0

    def line(self) -> str:
        return (
            f"Loaded {self.loaded} of {self.total} model tensors from {self.path} (backbone: {self.backbone_loaded} "
            f"of {self.backbone_total} tensors, {self.backbone_fraction:.0%} of its weights); "
            f"{len(self.incorrect_shapes)} skipped for mismatching shapes, {self.unused} in the file unused"
        )


def _summarize(model, incompatible, path: str) -> LoadSummary:
    # pixel_mean/std come from the config (DetectionCheckpointer ignores them too).
    state = {k: v for k, v in model.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
    missing = set(incompatible.missing_keys)
    backbone = [k for k in state if k.startswith("backbone.")]
    return LoadSummary(
        path=path,
        loaded=sum(k not in missing for k in state),
        total=len(state),
        backbone_loaded=sum(k not in missing for k in backbone),
        backbone_total=len(backbone),
        backbone_elements_loaded=sum(state[k].numel() for k in backbone if k not in missing),
        backbone_elements=sum(state[k].numel() for k in backbone),
        incorrect_shapes=list(incompatible.incorrect_shapes),
        unused=len(incompatible.unexpected_keys),
    )


def require_backbone_loaded(summary: LoadSummary | None, allow_partial: bool) -> None:
    """Stop when a checkpoint initialised less than MIN_BACKBONE_FRACTION of the backbone."""
    if summary is None or allow_partial or summary.backbone_fraction >= MIN_BACKBONE_FRACTION:
        return
    shapes = "; ".join(f"{k}: {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in summary.incorrect_shapes[:3])
    raise RuntimeError(
        f"{summary.line()}. Less than {MIN_BACKBONE_FRACTION:.0%} of the backbone came from the file, so the "
        "model would train mostly from its random initialisation"
        + (f" (e.g. {shapes})" if shapes else "")
        + ". Check that the file was made for this architecture (MODEL.RESNETS.DEPTH, FPN channels...) and, for "
        "a pretraining checkpoint, that it went through drcl-convert. Set MODEL.ALLOW_PARTIAL_WEIGHTS True to "
        "use it anyway."
    )


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose `.pth` and `last_checkpoint` are replaced atomically.

    fvcore writes the file in place, so a crash mid-write leaves a truncated checkpoint that
    `--resume` then fails to load. Here the previous checkpoint stays intact until the new one
    is complete, and `last_checkpoint` only ever names a complete file. A temporary left by a
    process killed mid-write is removed by :meth:`remove_stale_temporaries` (the trainer calls it
    at start-up).

    Loading names the file in every error (empty, truncated, not a checkpoint; a `last_checkpoint`
    naming no file) and logs one line saying how much of the model the file initialised
    (:class:`LoadSummary`, kept as ``load_summary``).

    `extra_state` (a dict) is written into every checkpoint at the top level, e.g. the
    ``"drcl_d2": {"method", "depth"}`` record by which drcl-convert recognises a pretraining run.
    """

    extra_state: dict | None = None
    load_summary: LoadSummary | None = None
    incompatible = None  # fvcore's _IncompatibleKeys of the last load

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(self.extra_state or {})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporaries of checkpoint writes that a crash interrupted; returns their names.

        Only call it when no other process writes checkpoints into save_dir (a run's start-up).
        """
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        stale = []
        for name in sorted(os.listdir(self.save_dir)):
            m = _TEMPORARY.match(name)
            if m and (m["target"].endswith(".pth") or m["target"] == "last_checkpoint"):
                os.remove(os.path.join(self.save_dir, name))
                stale.append(name)
        if stale:
            self.logger.warning(f"Removed {len(stale)} temporary file(s) of interrupted checkpoint writes from "
                                f"{self.save_dir}: {', '.join(stale)}")
        return stale

    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.isfile(path):
            tag = os.path.join(self.save_dir, "last_checkpoint")
            named = os.path.relpath(path, self.save_dir) if os.path.normpath(path) != os.path.normpath(self.save_dir) else ""
            present = sorted(f for f in os.listdir(self.save_dir) if f.endswith(".pth"))
            raise FileNotFoundError(
                f"--resume: {tag} names {named!r}, which is not a checkpoint file in {self.save_dir} "
                f"(checkpoints there: {', '.join(present) or 'none'}). Write the name of the checkpoint to resume "
                "from into it, or delete it to start from MODEL.WEIGHTS."
            )
        return path

    def load(self, path: str, checkpointables=None):
        self._loading_path = path
        return super().load(path, checkpointables)

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:
            size = os.path.getsize(filename) if os.path.isfile(filename) else "?"
            raise RuntimeError(
                f"Cannot read the checkpoint {filename} ({size} bytes): {type(e).__name__}: {e}. It is empty, "
                "truncated (an interrupted copy or download?) or not a PyTorch / detectron2 checkpoint."
            ) from e

    def _load_model(self, checkpoint):
        self.incompatible = incompatible = super()._load_model(checkpoint)  # fvcore's missing / unexpected keys
        self.load_summary = _summarize(self.model, incompatible, getattr(self, "_loading_path", "?"))
        self.logger.info(self.load_summary.line())
        return incompatible
