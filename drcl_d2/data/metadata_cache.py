"""An on-disk cache of the metadata drcl_d2 reads from an LVIS-format json, for the checks before
training (DATASETS.TEST jsons would otherwise be parsed at every start, in every rank).

Keyed by the json's real path, size and modification time; kept in $DRCL_D2_CACHE, else
$XDG_CACHE_HOME/drcl_d2, else ~/.cache/drcl_d2 (subfolder lvis_metadata). A cache that cannot be
read or written is ignored (logged at debug level): it only saves time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from ..utils import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "read_cached_metadata", "write_cached_metadata"]

_VERSION = 1  # bump when the recorded fields change


def cache_dir() -> str:
    root = os.environ.get("DRCL_D2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "drcl_d2")
    return os.path.join(root, "lvis_metadata")


def _key(json_file: str) -> tuple[str, dict] | None:
    try:
        st = os.stat(json_file)
    except OSError:
        return None
    real = os.path.realpath(json_file)
    entry = os.path.join(cache_dir(), hashlib.sha1(real.encode()).hexdigest() + ".json")
    return entry, {"json_file": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": _VERSION}


def read_cached_metadata(json_file: str) -> dict | None:
    """The metadata fields recorded for this exact file, or None (no entry, or the file changed)."""
    key = _key(json_file)
    if key is None or not os.path.isfile(key[0]):
        return None
    try:
        with open(key[0]) as f:
            entry = json.load(f)
    except (OSError, ValueError) as e:
        logger.debug(f"Ignoring unreadable metadata cache {key[0]}: {e}")
        return None
    if entry.get("key") != key[1]:
        return None
    fields = entry["fields"]
    # JSON has string keys and lists only: restore the int ids and (count, ids) pairs.
    fields["thing_dataset_id_to_contiguous_id"] = {int(k): v for k, v in fields["thing_dataset_id_to_contiguous_id"]}
    fields["annotations_lacking"] = {k: (v[0], v[1]) for k, v in fields["annotations_lacking"].items()}
    return fields


def write_cached_metadata(json_file: str, fields: dict) -> None:
    key = _key(json_file)
    if key is None:
        return
    fields = dict(fields, thing_dataset_id_to_contiguous_id=sorted(fields["thing_dataset_id_to_contiguous_id"].items()))
    try:
        atomic_write_json({"key": key[1], "fields": fields}, key[0])
    except OSError as e:
        logger.debug(f"Could not write the metadata cache {key[0]}: {e}")
