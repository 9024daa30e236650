"""Proposals files: both json forms, clipping, dropped boxes and images, errors; make_proposals."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from drcl_d2 import add_drcl_config
from drcl_d2.data.datasets import load_lvis_format_json
from drcl_d2.data.proposals import (
    check_proposals_against_images,
    load_proposals,
    load_proposals_from_config,
)
from drcl_d2.tools import make_proposals

LOGGER = "drcl_d2.data.proposals"
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")

RESULTS = [
    {"image_id": 1, "bbox": [10, 10, 20, 30], "score": 0.2, "category_id": 1},
    {"image_id": 1, "bbox": [0, 5, 50, 40], "score": 0.9, "category_id": 1},
    {"image_id": 2, "bbox": [1.5, 2.5, 3, 4], "score": 0.5, "category_id": 1},
]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def _dicts(*sizes):
    """Dataset dicts with ids 1.. and the given (height, width)."""
    return [{"image_id": i + 1, "file_name": f"{i + 1}.jpg", "height": h, "width": w}
            for i, (h, w) in enumerate(sizes)]


def test_both_json_forms_give_xyxy_sorted_by_score(tmp_path):
    as_list = _write(tmp_path / "list.json", RESULTS)
    as_dict = _write(tmp_path / "dict.json", {"images": [], "annotations": RESULTS, "categories": []})
    for f in (as_list, as_dict):
        props, stats = load_proposals(f, [1, 2])
        assert sorted(props) == [1, 2]
        assert props[1].dtype == np.float32 and props[1].shape == (2, 4)
        np.testing.assert_array_equal(props[1], [[0, 5, 50, 45], [10, 10, 30, 40]])  # score 0.9 first
        np.testing.assert_array_equal(props[2], [[1.5, 2.5, 4.5, 6.5]])
        assert stats["entries"] == 3 and stats["boxes"] == 3 and stats["images"] == 2
    # Without scores a box keeps its place in the file.
    no_score = _write(tmp_path / "noscore.json", [{k: v for k, v in r.items() if k != "score"} for r in RESULTS])
    props, _ = load_proposals(no_score, None)
    np.testing.assert_array_equal(props[1], [[10, 10, 30, 40], [0, 5, 50, 45]])


def test_non_finite_degenerate_and_unknown_ids_are_counted(tmp_path, caplog):
    entries = RESULTS + [
        {"image_id": 1, "bbox": [float("nan"), 0, 5, 5], "score": 0.3},
        {"image_id": 2, "bbox": [0, 0, 0.5, 10], "score": 0.3},  # narrower than 1 px
        {"image_id": 2, "bbox": [3, 3, 10, -2], "score": 0.3},  # negative height
        {"image_id": 42, "bbox": [0, 0, 10, 10], "score": 0.3},  # not in the dataset
        {"image_id": 43, "bbox": [0, 0, 10, 10]},
    ]
    f = _write(tmp_path / "p.json", entries)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        props, stats = load_proposals(f, [1, 2, 3])
    assert stats["non_finite"] == 1 and stats["degenerate"] == 2
    assert stats["unknown_image_entries"] == 2 and stats["unknown_images"] == 2
    assert stats["boxes"] == 3 and len(props[2]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("1 non-finite" in w and "(1, [nan" in w for w in warnings)
    assert any("2 degenerate" in w and "(2, [0, 0, 0.5, 10])" in w for w in warnings)
    assert any("ignored 2 proposal(s) of 2 image id(s)" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


def test_clipping_degenerate_after_clip_and_images_without_proposals(caplog):
    props = {
        1: np.array([[-5, -5, 20, 20], [10, 10, 30, 30], [70, 0, 90, 10]], np.float32),  # (3, 4)
        2: np.array([[0, 0, 10, 10]], np.float32),
        5: np.array([[0, 0, 10, 10]], np.float32),  # not a dataset image
    }
    dicts = _dicts((40, 64), (40, 64), (40, 64), (40, 64))  # ids 1..4; 3 and 4 have no proposals
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, kept, stats = check_proposals_against_images(props, dicts)
    assert [d["image_id"] for d in kept] == [1, 2] and sorted(out) == [1, 2]
    # [-5,-5,20,20] clipped; [70,0,90,10] lies right of the 64-px image: clipped to width 0, dropped.
    np.testing.assert_array_equal(out[1], [[0, 0, 20, 20], [10, 10, 30, 30]])
    assert stats == {"clipped": 2, "degenerate_after_clip": 1, "images_without_proposals": 2,
                     "images_kept": 2, "boxes": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("dropped 1 proposal box(es)" in w and "(1, [70.0, 0.0, 90.0, 10.0])" in w for w in warnings)
    missing = [w for w in warnings if "have no proposals" in w]
    assert len(missing) == 1 and "2 of 4 images" in missing[0] and "image ids 3, 4" in missing[0]
    with pytest.raises(ValueError, match="none of the 2 dataset images"):
        check_proposals_against_images({9: props[1]}, _dicts((40, 64), (40, 64)))


def test_invalid_files_raise_naming_the_file(tmp_path):
    cases = {
        "broken.json": "[{\"image_id\": 1, ",
        "scalar.json": "3",
        "noanns.json": json.dumps({"images": []}),
        "nobbox.json": json.dumps([{"image_id": 1, "score": 0.3}]),
        "shortbox.json": json.dumps([{"image_id": 1, "bbox": [1, 2, 3]}]),
        "strbox.json": json.dumps([{"image_id": 1, "bbox": ["1", 2, 3, 4]}]),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            load_proposals(str(tmp_path / name), [1])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_proposals(str(tmp_path / "missing.json"), [1])


def test_load_proposals_from_config(tmp_path):
    cfg = add_drcl_config(get_cfg())
    cfg.DATASETS.TRAIN = ("a", "b")
    cfg.INPUT.TWO_VIEW.PROPOSAL_FILES = (_write(tmp_path / "a.json", RESULTS[:2]),
                                         _write(tmp_path / "b.json", RESULTS[2:]))
    out, kept, stats = load_proposals_from_config(cfg, _dicts((40, 64), (40, 64), (40, 64)))
    assert [d["image_id"] for d in kept] == [1, 2] and stats["images_without_proposals"] == 1
    assert stats["entries"] == 3 and stats["boxes"] == 3 and len(out[1]) == 2
    cfg.INPUT.TWO_VIEW.PROPOSAL_FILES = (cfg.INPUT.TWO_VIEW.PROPOSAL_FILES[0],)
    with pytest.raises(ValueError, match="one proposals file per dataset"):
        load_proposals_from_config(cfg, _dicts((40, 64)))


@pytest.fixture
def one_thread():
    """One intra-op thread: the 2 shared CI cores run much faster without oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_make_proposals_on_tiny_val(tiny_dataset, tmp_path, one_thread):
    out_file = tmp_path / "props" / "val_proposals.json"
    name = "test_make_proposals_tiny_val"
    lvis_custom = str([[name, tiny_dataset["val_json"], tiny_dataset["image_root"]]])
    summary = make_proposals.main([
        "--config-file", CONFIG, "--dataset", name,
        "--output", str(out_file), "--topk", "20",
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "12",
        "INPUT.MIN_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0", "DATASETS.LVIS_CUSTOM", lvis_custom,
    ])
    dicts = load_lvis_format_json(tiny_dataset["val_json"], tiny_dataset["image_root"])
    sizes = {d["image_id"]: (d["height"], d["width"]) for d in dicts}
    assert len(sizes) == 40 and summary["images"] == 40
    results = json.loads(out_file.read_text())
    assert not list(out_file.parent.glob("*.tmp*"))  # atomic write left no temporary file
    per_image = {}
    for r in results:
        assert r["category_id"] == 1 and 0.0 <= r["score"] <= 1.0
        h, w = sizes[r["image_id"]]
        x, y, bw, bh = r["bbox"]
        assert x >= 0 and y >= 0 and bw > 0 and bh > 0
        assert x + bw <= w + 1e-3 and y + bh <= h + 1e-3
        per_image.setdefault(r["image_id"], []).append(r["score"])
    assert set(per_image) == set(sizes)  # every image present
    assert all(len(s) <= 20 for s in per_image.values())
    assert all(s == sorted(s, reverse=True) for s in per_image.values())
    assert summary["boxes"] == len(results)
    props, stats = load_proposals(str(out_file), sizes)
    assert sorted(props) == sorted(sizes) and stats["boxes"] == len(results) - stats["degenerate"]
    out, kept, _ = check_proposals_against_images(props, dicts)
    assert len(kept) == 40
