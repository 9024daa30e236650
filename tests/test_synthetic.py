"""Tests of the embedded long-tailed dataset generator (drcl_d2.data.synthetic).

They run the real generator, LVIS API, pycocotools and detectron2 loader on the 'tiny' preset
(made once per session by the ``tiny_dataset`` fixture in conftest.py) and on even smaller
custom datasets where a fresh directory is needed.
"""
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from drcl_d2.data import synthetic
from drcl_d2.utils import frequency_group
from drcl_d2.data.synthetic import (
    COLOURS,
    PRESETS,
    category_specs,
    longtail_image_counts,
    make_longtail_dataset,
)

# A dataset small enough to regenerate several times per test (well under a second each).
MICRO = dict(num_train_images=20, num_val_images=8, num_categories=5, image_size=(64, 80),
             max_objects_per_image=3)


COLOUR_NAMES = [name for name, _ in COLOURS]
PALETTE = np.array([rgb for _, rgb in COLOURS], float)
PALETTE /= PALETTE.sum(1, keepdims=True)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny(tiny_dataset):
    return tiny_dataset, _load(tiny_dataset["train_json"]), _load(tiny_dataset["val_json"])


def _ann_mask(ann, img):
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
    return rle, mask_utils.decode(rle).astype(bool)


# --------------------------------------------------------------------------------------------
# Layout and schema
# --------------------------------------------------------------------------------------------
def test_layout_and_return_value(tiny):
    out, train, val = tiny
    root = out["image_root"]
    assert out["train_json"] == os.path.join(root, "lvis_v1_train.json")
    assert out["val_json"] == os.path.join(root, "lvis_v1_val.json")
    assert out["categories"] == PRESETS["tiny"]["num_categories"]
    manifest = _load(os.path.join(root, "manifest.json"))
    assert manifest["version"] == synthetic.DATASET_VERSION
    assert manifest["params"]["num_train_images"] == PRESETS["tiny"]["num_train_images"]
    assert manifest["params"]["image_size"] == list(PRESETS["tiny"]["image_size"])
    assert len(train["images"]) == PRESETS["tiny"]["num_train_images"]
    assert len(val["images"]) == PRESETS["tiny"]["num_val_images"]
    for split, data in (("train2017", train), ("val2017", val)):
        for img in data["images"]:
            name = f"{img['id']:012d}.jpg"
            assert img["file_name"] == f"{split}/{name}"
            assert img["coco_url"] == f"http://images.cocodataset.org/{split}/{name}"
            assert os.path.isfile(os.path.join(root, img["file_name"]))
    # No stray files (e.g. leftover temp json).
    assert sorted(os.listdir(root)) == ["lvis_v1_train.json", "lvis_v1_val.json", "manifest.json",
                                        "train2017", "val2017"]


def test_every_lvis_field_with_right_types(tiny):
    _, train, val = tiny
    for data in (train, val):
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        for img in data["images"]:
            assert isinstance(img["id"], int)
            assert isinstance(img["height"], int) and isinstance(img["width"], int)
            assert isinstance(img["file_name"], str) and isinstance(img["coco_url"], str)
            assert all(isinstance(c, int) for c in img["neg_category_ids"])
            assert all(isinstance(c, int) for c in img["not_exhaustive_category_ids"])
        for ann in data["annotations"]:
            assert {"id", "image_id", "category_id", "bbox", "area", "segmentation"} <= set(ann)
            assert isinstance(ann["id"], int) and isinstance(ann["image_id"], int)
            assert isinstance(ann["category_id"], int)
            assert len(ann["bbox"]) == 4 and all(isinstance(v, float) for v in ann["bbox"])
            assert ann["bbox"][2] > 0 and ann["bbox"][3] > 0
            assert isinstance(ann["area"], float) and ann["area"] > 0
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
            for poly in ann["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
                assert all(isinstance(v, float) for v in poly)
        for cat in data["categories"]:
            assert isinstance(cat["id"], int) and isinstance(cat["name"], str)
            assert cat["synset"] == cat["name"] + ".n.01"
            assert cat["synonyms"] == [cat["name"]]
            assert isinstance(cat["def"], str) and len(cat["def"]) > 10
            assert cat["frequency"] in ("r", "c", "f")
            assert isinstance(cat["image_count"], int) and isinstance(cat["instance_count"], int)
    assert train["categories"] == val["categories"]


def test_ids_unique_and_consistent(tiny):
    _, train, val = tiny
    img_ids = [i["id"] for i in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(img_ids)) == len(img_ids)
    assert len(set(ann_ids)) == len(ann_ids)
    C = len(train["categories"])
    assert [c["id"] for c in train["categories"]] == list(range(1, C + 1))
    assert len({c["name"] for c in train["categories"]}) == C
    for data in (train, val):
        ids = {i["id"] for i in data["images"]}
        present = {}
        for a in data["annotations"]:
            assert a["image_id"] in ids and 1 <= a["category_id"] <= C
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        assert set(present) == ids  # every image has at least one object
        for img in data["images"]:
            # LVIS semantics: negatives are verified absent; not-exhaustive ones are present.
            assert not set(img["neg_category_ids"]) & present[img["id"]]
            assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
            assert all(1 <= c <= C for c in img["neg_category_ids"])
    assert any(img["neg_category_ids"] for img in train["images"])


# --------------------------------------------------------------------------------------------
# Long tail
# --------------------------------------------------------------------------------------------
def test_frequency_labels_match_actual_train_counts(tiny):
    _, train, _ = tiny
    images, instances = {}, {}
    for a in train["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    for cat in train["categories"]:
        n = len(images.get(cat["id"], ()))
        assert n >= 1
        assert cat["image_count"] == n
        assert cat["instance_count"] == instances[cat["id"]] >= n
        expected = "r" if n <= 10 else ("c" if n <= 100 else "f")
        assert cat["frequency"] == expected == frequency_group(n)


def test_tiny_has_all_three_bands_and_val_covers_every_category(tiny):
    out, train, val = tiny
    bands = [c["frequency"] for c in train["categories"]]
    assert {b: bands.count(b) for b in "rcf"} == out["frequency_counts"]
    assert all(bands.count(b) >= 1 for b in "rcf"), bands
    val_cats = {a["category_id"] for a in val["annotations"]}
    assert val_cats == {c["id"] for c in train["categories"]}


def test_longtail_counts_shape():
    for preset in ("tiny", "small", "medium"):
        p = PRESETS[preset]
        counts = longtail_image_counts(p["num_categories"], p["num_train_images"])
        assert len(counts) == p["num_categories"]
        assert np.all(np.diff(counts) >= 0) and counts.min() == 1
        labels = [frequency_group(int(c)) for c in counts]
        assert all(labels.count(b) >= 1 for b in "rcf"), (preset, counts)
        assert labels.count("r") >= 2
    # Demo size: the largest category is in about half the images (LVIS shape scaled down).
    counts = longtail_image_counts(24, 400)
    assert 0.4 * 400 <= counts.max() <= 0.6 * 400
    assert (counts > 100).sum() >= 3
    # Too few images for a frequent band: still a long tail from 1 image up to ~half.
    counts = longtail_image_counts(10, 60)
    assert counts.min() == 1 and counts.max() == 30 and np.all(counts <= 100)


def test_category_specs_are_distinct():
    specs = category_specs(synthetic.MAX_CATEGORIES)
    triples = {(s["shape"], s["colour"], s["texture"]) for s in specs}
    assert len(triples) == synthetic.MAX_CATEGORIES
    assert len({s["name"] for s in specs}) == synthetic.MAX_CATEGORIES
    with pytest.raises(ValueError):
        category_specs(synthetic.MAX_CATEGORIES + 1)


# --------------------------------------------------------------------------------------------
# Masks and pictures
# --------------------------------------------------------------------------------------------
def test_images_decode_with_declared_size(tiny):
    out, train, val = tiny
    for img in train["images"] + val["images"]:
        with Image.open(os.path.join(out["image_root"], img["file_name"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"])


def test_masks_match_the_pictures(tiny):
    out, train, _ = tiny
    specs = category_specs(len(train["categories"]))
    images = {i["id"]: i for i in train["images"]}
    rng = np.random.default_rng(0)
    sample = rng.choice(len(train["annotations"]), size=40, replace=False)
    inside_fracs, ring_fracs = [], []
    for k in sample:
        ann = train["annotations"][k]
        img = images[ann["image_id"]]
        rle, m = _ann_mask(ann, img)
        # Polygon area and bounds agree with the stored area (mask pixels) and bbox.
        assert abs(float(mask_utils.area(rle)) - ann["area"]) <= 0.03 * ann["area"] + 2
        np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"], atol=1.5)
        # The polygon covers the category's colour: the mean chromaticity inside (the texture's
        # second colour is a darker shade of the same hue) is nearest to the category's palette
        # colour, and much nearer than the rest of the picture is.
        px = np.asarray(Image.open(os.path.join(out["image_root"], img["file_name"])), float)
        inside = px[m].mean(0) / px[m].mean(0).sum()
        outside = px[~m].mean(0) / px[~m].mean(0).sum()
        ref = np.asarray(specs[ann["category_id"] - 1]["rgb"], float)
        ref /= ref.sum()
        assert COLOUR_NAMES[int(np.linalg.norm(PALETTE - inside, axis=1).argmin())] == \
            specs[ann["category_id"] - 1]["colour"]
        assert np.linalg.norm(inside - ref) + 0.05 < np.linalg.norm(outside - ref)
        # Alignment: a 2-px ring just outside the mask holds far fewer such pixels than inside.
        chroma = px / np.maximum(px.sum(-1, keepdims=True), 1.0)
        close = np.linalg.norm(chroma - ref, axis=-1) < 0.1
        ring = cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~m
        inside_fracs.append(close[m].mean())
        ring_fracs.append(close[ring].mean())
    assert np.mean(inside_fracs) > np.mean(ring_fracs) + 0.3, (inside_fracs, ring_fracs)


def test_objects_overlap_sometimes(tiny):
    """Occlusion exists: some boxes in the same image intersect."""
    _, train, _ = tiny
    by_img = {}
    for a in train["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a["bbox"])
    overlaps = 0
    for boxes in by_img.values():
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                if min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2):
                    overlaps += 1
    assert overlaps >= 10


# --------------------------------------------------------------------------------------------
# Determinism, idempotence, parameters
# --------------------------------------------------------------------------------------------
def test_determinism(tiny, tmp_path):
    out, _, _ = tiny
    same = make_longtail_dataset(str(tmp_path / "same"), **PRESETS["tiny"])
    for key in ("train_json", "val_json"):
        with open(out[key], "rb") as a, open(same[key], "rb") as b:
            assert a.read() == b.read()
    for name in ("train2017/000000000001.jpg", "val2017/000000000161.jpg"):
        with open(os.path.join(out["image_root"], name), "rb") as a, \
                open(os.path.join(same["image_root"], name), "rb") as b:
            assert a.read() == b.read()
    other = make_longtail_dataset(str(tmp_path / "other"), **dict(PRESETS["tiny"], seed=1))
    with open(out["train_json"], "rb") as a, open(other["train_json"], "rb") as b:
        assert a.read() != b.read()
    # Same long tail for every seed, different pictures.
    assert other["image_counts"] == out["image_counts"]


def test_idempotent_reuse_and_parameter_mismatch(tmp_path):
    root = str(tmp_path / "ds")
    first = make_longtail_dataset(root, **MICRO)
    assert first["generated"] is True
    image = os.path.join(root, "train2017", "000000000001.jpg")
    stamps = {p: os.stat(p).st_mtime_ns for p in (first["train_json"], first["val_json"], image)}
    again = make_longtail_dataset(root, **MICRO)
    assert again["generated"] is False
    assert again["frequency_counts"] == first["frequency_counts"]
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    with pytest.raises(ValueError, match="different parameters"):
        make_longtail_dataset(root, **dict(MICRO, seed=3))
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # nothing touched

    redone = make_longtail_dataset(root, overwrite=True, **dict(MICRO, num_train_images=15))
    assert redone["generated"] is True
    assert len(_load(redone["train_json"])["images"]) == 15
    assert not os.path.exists(os.path.join(root, "train2017", "000000000020.jpg"))  # stale gone

    # A missing file makes the same-parameter call regenerate instead of returning a broken set.
    os.remove(os.path.join(root, "val2017", "000000000016.jpg"))
    fixed = make_longtail_dataset(root, **dict(MICRO, num_train_images=15))
    assert fixed["generated"] is True
    assert os.path.isfile(os.path.join(root, "val2017", "000000000016.jpg"))


def test_a_corrupt_manifest_is_an_error_naming_it(tmp_path, capsys):
    """It was a bare JSONDecodeError without the file; --overwrite regenerates."""
    root = tmp_path / "ds"
    make_longtail_dataset(str(root), **MICRO)
    (root / "manifest.json").write_text('{"version": 1, "params": {')
    args = [str(root), "--train-images", str(MICRO["num_train_images"]), "--val-images", str(MICRO["num_val_images"]),
            "--categories", str(MICRO["num_categories"])]
    assert synthetic.main(args) == 2
    err = capsys.readouterr().err
    assert f"{root / 'manifest.json'} is not a valid manifest" in err and "--overwrite" in err
    assert synthetic.main(args + ["--overwrite"]) == 0
    assert _load(str(root / "manifest.json"))["version"] == synthetic.DATASET_VERSION


def test_infeasible_parameters_raise(tmp_path):
    with pytest.raises(ValueError):
        make_longtail_dataset(str(tmp_path / "a"), num_train_images=2, num_val_images=2,
                              num_categories=10, image_size=(64, 64), max_objects_per_image=2)
    with pytest.raises(ValueError):
        make_longtail_dataset(str(tmp_path / "b"), **dict(MICRO, image_size=(16, 16)))


def test_cli(tmp_path, capsys):
    root = str(tmp_path / "cli")
    args = [root, "--preset", "tiny", "--train-images", "20", "--val-images", "6",
            "--categories", "4", "--seed", "5"]
    assert synthetic.main(args) == 0
    assert "categories: 4" in capsys.readouterr().out
    manifest = _load(os.path.join(root, "manifest.json"))
    assert manifest["params"]["num_train_images"] == 20
    assert manifest["params"]["num_categories"] == 4
    assert manifest["params"]["seed"] == 5
    assert manifest["params"]["image_size"] == list(PRESETS["tiny"]["image_size"])
    assert synthetic.main(args[:-1] + ["6"]) == 2  # other seed, no --overwrite
    assert "different parameters" in capsys.readouterr().err
    assert synthetic.main(args[:-1] + ["6", "--overwrite"]) == 0


# --------------------------------------------------------------------------------------------
# Real loaders
# --------------------------------------------------------------------------------------------
def test_lvis_api_and_detectron2_loader(tiny):
    from detectron2.data.datasets.lvis import load_lvis_json
    from detectron2.structures import BoxMode
    from lvis import LVIS

    out, train, val = tiny
    for path, data in ((out["train_json"], train), (out["val_json"], val)):
        api = LVIS(path)
        assert sorted(api.get_cat_ids()) == [c["id"] for c in data["categories"]]
        assert len(api.get_img_ids()) == len(data["images"])
        assert len(api.get_ann_ids()) == len(data["annotations"])

        dicts = load_lvis_json(path, out["image_root"] + "/")
        assert len(dicts) == len(data["images"])
        assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
        for d in dicts[:20]:
            assert os.path.isfile(d["file_name"])
            with Image.open(d["file_name"]) as im:
                assert im.size == (d["width"], d["height"])
            for obj in d["annotations"]:
                assert obj["bbox_mode"] == BoxMode.XYWH_ABS
                assert 0 <= obj["category_id"] < out["categories"]
