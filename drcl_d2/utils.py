"""Helpers the commands, the converter and the data generator share: atomic writes, tool configs, LVIS
frequency groups and the unpadded part of a feature map."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Optional, Sequence

__all__ = ["COMMON_MAX_IMAGES", "RARE_MAX_IMAGES", "atomic_write", "atomic_write_json", "frequency_group",
           "load_config", "seeded_rng", "unpadded_size"]

# LVIS v1's frequency groups by the number of training images that contain a category:
# rare <= 10 < common <= 100 < frequent.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


def frequency_group(image_count: int) -> str:
    """"r", "c" or "f": the LVIS frequency group of a category with ``image_count`` training images."""
    return "r" if image_count <= RARE_MAX_IMAGES else "c" if image_count <= COMMON_MAX_IMAGES else "f"


def unpadded_size(height: int, width: int, stride: int) -> tuple:
    """(rows, cols) of a stride-``stride`` feature map that an image of ``height`` x ``width`` covers
    inside a padded batch: ceil(height / stride) x ceil(width / stride), as the backbone's stride-2
    convolutions with "same" padding round up. The cells beyond hold only padding.
    """
    return -(-height // stride), -(-width // stride)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Torch seeded with ``seed`` inside the block (a reproducible model init); the caller's CPU RNG
    state is restored after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``path`` through ``write(binary file)``: a reader, or a crash, sees the old file or the new one.

    The temporary lies in the same folder (os.replace is atomic within one file system) and is named
    ``.<name>.<random>.tmp``; when ``check(temporary path)`` is given it runs before the rename (an
    existing file is replaced only when it passes), and the temporary keeps ``path``'s extension, by
    which detectron2 picks its reader. The file gets the mode a plain open() gives (0666 less the
    umask), as fvcore's checkpoints have; mkstemp would leave 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = ".tmp" + (os.path.splitext(path)[1] if check else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj: Any, path: str, **dump_kwargs) -> None:
    """``obj`` as JSON (``json.dumps`` keywords) at ``path``, atomically, with a final newline."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, **dump_kwargs) + "\n").encode()))


def load_config(config_file: str, opts: Sequence[str] = (), device: Optional[str] = None,
                register_datasets: bool = False):
    """The config of a command: get_cfg + drcl_d2's keys + ``config_file`` + ``opts`` (KEY VALUE ...).

    ``config_file`` is a path or a detectron2 model-zoo name (``COCO-Detection/faster_rcnn_R_50_C4_1x.yaml``).
    ``device`` sets MODEL.DEVICE; without it a CUDA device falls back to the CPU when none is present.
    ``register_datasets``: register the config's DATASETS.LVIS_CUSTOM datasets (nothing is read); off
    by default, since a process may already hold other files under those names (the demo's, a
    test's). Errors are ValueErrors naming the file; the config is returned unfrozen.
    """
    import torch
    from detectron2.config import get_cfg

    from drcl_d2.config import add_drcl_config
    from drcl_d2.data.datasets import register_datasets_from_config

    path = config_file
    if not os.path.isfile(path):
        try:
            from detectron2 import model_zoo

            path = model_zoo.get_config_file(config_file)
        except Exception as e:  # noqa: BLE001 - any failure means "no such config"
            raise ValueError(f"config file not found: {config_file} (nor a detectron2 model-zoo config)") from e
    cfg = add_drcl_config(get_cfg())
    try:
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
    except Exception as e:  # yaml syntax, unknown key, bad _BASE_ or override: all surface here
        raise ValueError(f"cannot read config {config_file} with {list(opts)}: {type(e).__name__}: {e}") from e
    if device is not None:
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # The same configs serve GPU clusters and CPU machines (tests, the demo).
        logging.getLogger("drcl_d2").warning("No CUDA device available: running on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    if register_datasets:
        register_datasets_from_config(cfg)
    return cfg
