"""Helpers the commands, the converter and the data generator share: atomic writes, tool configs, LVIS
frequency groups and the unpadded part of a feature map."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, Optional, Sequence

__all__ = ["COMMON_MAX_IMAGES", "RARE_MAX_IMAGES", "atomic_write", "atomic_write_json", "frequency_group",
           "load_config", "seeded_rng", "ceil_div", "unpadded_size", "MAX_NAMED", "name_some"]

# LVIS v1's frequency groups by the number of training images that contain a category:
# rare <= 10 < common <= 100 < frequent.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


def frequency_group(image_count: int) -> str:
    """"r", "c" or "f": the LVIS frequency group of a category with ``image_count`` training images."""
    return "r" if image_count <= RARE_MAX_IMAGES else "c" if image_count <= COMMON_MAX_IMAGES else "f"


MAX_NAMED = 5  # how many offending ids an error or warning lists


def name_some(items, total: int | None = None) -> str:
    """The first few items, comma-separated, and how many more there are (of `total` if given)."""
    items = list(items)
    total = len(items) if total is None else total
    more = f" (and {total - MAX_NAMED} more)" if total > MAX_NAMED else ""
    return ", ".join(str(i) for i in items[:MAX_NAMED]) + more


def ceil_div(size, stride):
    """ceil(size / stride) for ints or integer tensors (broadcasting): the cells of a stride-``stride``
    feature map that ``size`` pixels of an image cover in a padded batch (stride-2 "same" convolutions
    round up)."""
    return -(-size // stride)


def unpadded_size(height: int, width: int, stride: int) -> tuple:
    """(rows, cols) of a stride-``stride`` feature map that a ``height`` x ``width`` image covers in a padded
    batch: ceil_div of each side."""
    return ceil_div(height, stride), ceil_div(width, stride)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Torch seeded with ``seed`` inside the block (a reproducible model init); the caller's CPU RNG
    state is restored after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def atomic_write(path: str, write: Callable[[Any], None], check: Optional[Callable[[str], None]] = None) -> None:
    """Write ``path`` through ``write(binary file)``: a reader, or a crash, sees the old file or the new one.

    The temporary ``.<name>.<8 random hex digits>.tmp`` lies in the same folder (os.replace is atomic
    there); ``check(temporary path)``, when given, runs before the rename, on a temporary that keeps
    ``path``'s extension (detectron2 picks its reader by it). The file gets the mode a plain open()
    gives, 0666 less the umask, as fvcore's checkpoints have (mkstemp would leave 0600).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = ".tmp" + (os.path.splitext(path)[1] if check else "")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}{suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
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
    """The config of a command: get_cfg + drcl_d2's keys + ``config_file`` (a path or a detectron2
    model-zoo name) + ``opts`` (KEY VALUE ...), unfrozen; errors are ValueErrors naming the file.

    ``device`` sets MODEL.DEVICE; without it a CUDA device falls back to the CPU when none is present.
    ``register_datasets``: register DATASETS.LVIS_CUSTOM (off by default: a process may already hold
    other files under those names).
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
