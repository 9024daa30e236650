"""Checkpoints that a crash cannot corrupt."""
from __future__ import annotations

from __future__ import annotations

import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer", "atomic_torch_save", "atomic_write_text"]


def _atomic_replace(path: str, write) -> None:
    """Write to a temporary file in the target's folder, fsync, then rename over the target.

    os.replace is atomic on POSIX: a reader (or a crash) sees either the old file or the new one,
    never a half-written one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    _atomic_replace(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_replace(path, lambda f: f.write(text.encode()))


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose `.pth` and `last_checkpoint` are replaced atomically.

    fvcore writes the file in place, so a crash mid-write leaves a truncated checkpoint that
    `--resume` then fails to load. Here the previous checkpoint stays intact until the new one
    is complete, and `last_checkpoint` only ever names a complete file.

    `extra_state` (a dict) is written into every checkpoint at the top level, e.g. the
    ``"drcl_d2": {"method", "depth"}`` record by which drcl-convert recognises a pretraining run.
    """

    extra_state: dict | None = None

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
