"""Shared fixtures: a tiny embedded LVIS-format dataset made once per session."""
import os
import tempfile

import pytest

import drcl_d2  # noqa: F401  (registers the NumPy-2 fix for lvis before any test uses it)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """{"train_json", "val_json", "image_root", ...} of the 'tiny' embedded dataset."""
    from drcl_d2.data.synthetic import PRESETS, make_longtail_dataset

    root = tmp_path_factory.mktemp("embedded_tiny")
    return make_longtail_dataset(str(root), **PRESETS["tiny"])


# drcl_d2's metadata cache (drcl_d2.data.metadata_cache) in a folder of this test session, not ~/.cache;
# set at import so that subprocesses started by tests inherit it.
os.environ["DRCL_D2_CACHE"] = tempfile.mkdtemp(prefix="drcl_d2_cache_")

