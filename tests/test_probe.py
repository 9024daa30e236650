"""kNN probe of RoI features (drcl_d2.tools.probe): the kNN and metrics by hand, then the real
detector (random init) on the tiny embedded dataset: self-retrieval, counts per group, errors, CLI."""
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog

from drcl_d2.data.datasets import load_lvis_format_json
from drcl_d2.tools import probe
from drcl_d2.utils import load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")
TRAIN, VAL = "test_probe_tiny_train", "test_probe_tiny_val"
NUM_TRAIN_IMAGES, NUM_TEST_IMAGES = 40, 16
METRIC_KEYS = ["acc", "acc_r", "acc_c", "acc_f", "mean_class_acc",
               "mean_class_acc_r", "mean_class_acc_c", "mean_class_acc_f"]


# ---------------------------------------------------------------------------------------------
# kNN and metrics on hand-made numbers
# ---------------------------------------------------------------------------------------------
def test_knn_weighted_vote_differs_from_majority_and_ignores_norms():
    # Test point along x. Train: one class-0 point almost on it, two class-1 points at 60 degrees.
    train = torch.tensor([[1.0, 0.05], [0.5, 0.866], [0.5, -0.866]]) * torch.tensor([[3.0], [1.0], [7.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])
    # exp(0.999 / 0.07) = 1.6e6 beats 2 * exp(0.5 / 0.07) = 2.5e3; a plain majority picks class 1.
    assert probe.knn_predict(train, labels, test, k=3, num_classes=2, temperature=0.07).tolist() == [0]
    assert probe.knn_predict(train, labels, test, k=3, num_classes=2, temperature=0).tolist() == [1]
    # k=1: the nearest one only; k larger than the train set is clipped.
    assert probe.knn_predict(train, labels, test, k=1, num_classes=2, temperature=0).tolist() == [0]
    assert probe.knn_predict(train, labels, test, k=50, num_classes=3, temperature=0).tolist() == [1]


def test_metrics_per_group_and_mean_per_class_by_hand():
    groups = ["f", "c", "r", "r"]  # class -> LVIS frequency group
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0])
    m = probe.probe_metrics(predictions, labels, groups, train_labels=torch.tensor([0, 1, 2]))
    assert m["acc"] == pytest.approx(5 / 8)
    assert m["acc_f"] == pytest.approx(3 / 4) and m["acc_c"] == pytest.approx(1 / 2)
    assert m["acc_r"] == pytest.approx(1 / 2)  # class 2 right, class 3 wrong
    assert m["mean_class_acc"] == pytest.approx((3 / 4 + 1 / 2 + 1 + 0) / 4)
    assert m["mean_class_acc_r"] == pytest.approx(0.5) and m["mean_class_acc_f"] == pytest.approx(0.75)
    assert (m["num_test"], m["num_test_r"], m["num_test_c"], m["num_test_f"]) == (8, 2, 2, 4)
    assert m["num_test_classes"] == 4 and m["num_test_unseen"] == 1  # class 3 has no train RoI
    # A group without test RoIs, and no frequencies at all: null, not 0.
    m = probe.probe_metrics(predictions[:4], labels[:4], groups)
    assert m["acc_r"] is None and m["mean_class_acc_c"] is None and m["num_test_r"] == 0
    m = probe.probe_metrics(predictions, labels, None)
    assert m["acc"] == pytest.approx(5 / 8) and m["acc_f"] is None and m["num_test_f"] is None


# ---------------------------------------------------------------------------------------------
# the real detector on the tiny embedded dataset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the 2 shared CI cores run much faster without oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cli_opts(tiny_dataset):
    """Config overrides: the tiny train / val splits registered under this file's names, 128 px."""
    lvis_custom = [[TRAIN, tiny_dataset["train_json"], tiny_dataset["image_root"]],
                   [VAL, tiny_dataset["val_json"], tiny_dataset["image_root"]]]
    return ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "12", "INPUT.MIN_SIZE_TEST", "128",
            "DATASETS.LVIS_CUSTOM", str(lvis_custom), "DATASETS.TRAIN", f"('{TRAIN}',)",
            "DATASETS.TEST", f"('{VAL}',)"]


@pytest.fixture(scope="module")
def cfg(cli_opts):
    return load_config(CONFIG, cli_opts, register_datasets=True)


@pytest.fixture(scope="module")
def train_to_val(cfg, one_thread):
    """Random-init probe, default datasets (DATASETS.TRAIN[0] -> TEST[0]), first 40 / 16 images."""
    return probe.run_probe(cfg, "", None, None, NUM_TRAIN_IMAGES, NUM_TEST_IMAGES, k=5)


def _gt_labels(json_file, image_root, num_images):
    """Contiguous category ids of the non-crowd gt boxes of the first num_images images with a box."""
    dicts = [d for d in load_lvis_format_json(json_file, image_root) if d["annotations"]][:num_images]
    return [a["category_id"] for d in dicts for a in d["annotations"]]


def _per_group(labels, json_file):
    with open(json_file) as f:
        frequency = [c["frequency"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    return {g: sum(frequency[c] == g for c in labels) for g in "rcf"}


def test_k1_on_the_same_set_finds_every_roi_itself(cfg, one_thread):
    # Train == test: each RoI's nearest neighbour is itself, so k=1 is right for every RoI, unless
    # two RoIs of different classes had identical features (e.g. a box lost or features collapsed).
    result = probe.run_probe(cfg, "", VAL, VAL, 24, 24, k=1)
    for feature in ("box_head", "backbone"):
        assert result[feature]["acc"] == 1.0, feature
        assert result[feature]["mean_class_acc"] == 1.0
        assert result[feature]["num_train"] == result[feature]["num_test"] > 24
    # Half the images on the train side: the other half's RoIs can only match RoIs of other
    # images, and with random weights some get the wrong class (the probe never sees test labels).
    fewer = probe.run_probe(cfg, "", VAL, VAL, 12, 24, k=1)
    assert fewer["box_head"]["num_train"] < fewer["box_head"]["num_test"]
    assert fewer["box_head"]["acc"] < 1.0


def test_train_to_val_groups_counts_and_ranges(train_to_val, tiny_dataset):
    root = tiny_dataset["image_root"]
    train_labels = _gt_labels(tiny_dataset["train_json"], root, NUM_TRAIN_IMAGES)
    val_labels = _gt_labels(tiny_dataset["val_json"], root, NUM_TEST_IMAGES)
    val_counts = _per_group(val_labels, tiny_dataset["val_json"])
    assert train_to_val["train_dataset"] == TRAIN and train_to_val["test_dataset"] == VAL
    assert (train_to_val["num_train_images"], train_to_val["num_test_images"]) == (NUM_TRAIN_IMAGES, NUM_TEST_IMAGES)
    for feature in ("backbone", "box_head"):
        r = train_to_val[feature]
        assert r["num_test"] == len(val_labels) and r["num_train"] == len(train_labels)
        assert {g: r[f"num_test_{g}"] for g in "rcf"} == val_counts
        assert r["num_test_classes"] == len(set(val_labels))
        assert r["num_test_unseen"] == sum(c not in set(train_labels) for c in val_labels)
        for key in METRIC_KEYS:
            if key.endswith(("_r", "_c", "_f")) and val_counts[key[-1]] == 0:
                assert r[key] is None, key
            else:
                assert 0.0 <= r[key] <= 1.0, key
    assert train_to_val["backbone"]["layer"] == "res5" and train_to_val["box_head"]["layer"] == "fc7"
    assert train_to_val["backbone"]["dim"] == 512 and train_to_val["box_head"]["dim"] == 512  # R18, FC_DIM
    # Random weights still carry colour and shape: the box head's kNN beats always answering the
    # most common train class.
    most_common = max(set(train_labels), key=train_labels.count)
    assert train_to_val["box_head"]["acc"] > val_labels.count(most_common) / len(val_labels)


def test_weights_file_is_loaded(cfg, one_thread, tmp_path):
    # A model_final.pth holding the seed-1 random init, loaded into a seed-0 model, gives the
    # numbers of the seed-1 model; the seed-0 model itself gives others.
    weights = str(tmp_path / "model_final.pth")
    torch.save({"model": probe._build_model(cfg, "", seed=1).state_dict()}, weights)
    loaded = probe.run_probe(cfg, weights, TRAIN, VAL, 16, 16, k=3, seed=0)
    seed1 = probe.run_probe(cfg, "", TRAIN, VAL, 16, 16, k=3, seed=1)
    seed0 = probe.run_probe(cfg, "", TRAIN, VAL, 16, 16, k=3, seed=0)
    assert loaded["weights"] == weights
    for feature in ("backbone", "box_head"):
        assert loaded[feature] == seed1[feature]
    assert seed0["box_head"] != seed1["box_head"]


def test_bad_inputs_raise_errors_naming_them(cfg, tmp_path):
    with pytest.raises(ValueError, match="'no_such_dataset' is not registered"):
        probe.run_probe(cfg, "", "no_such_dataset", VAL, 2, 2, k=1)
    missing = str(tmp_path / "missing_model.pth")
    with pytest.raises(ValueError, match="weights file not found: .*missing_model.pth"):
        probe.run_probe(cfg, missing, VAL, VAL, 2, 2, k=1)
    DatasetCatalog.register("test_probe_unlabeled", lambda: [
        {"file_name": "a.jpg", "height": 8, "width": 8, "image_id": 1, "annotations": []}])
    try:
        with pytest.raises(ValueError, match="'test_probe_unlabeled' has no annotations"):
            probe.run_probe(cfg, "", "test_probe_unlabeled", VAL, 2, 2, k=1)
    finally:
        DatasetCatalog.remove("test_probe_unlabeled")
    with pytest.raises(ValueError, match="k must be >= 1"):
        probe.run_probe(cfg, "", VAL, VAL, 2, 2, k=0)


def test_cli_writes_the_json_of_run_probe(cli_opts, train_to_val, tmp_path, capsys, one_thread):
    out = tmp_path / "out" / "probe.json"
    returned = probe.main(["--config-file", CONFIG, "--weights", "", "--max-train-images", str(NUM_TRAIN_IMAGES),
                           "--max-test-images", str(NUM_TEST_IMAGES), "--k", "5", "--output", str(out), *cli_opts])
    written = json.loads(out.read_text())
    assert not [p for p in out.parent.iterdir() if p.name != "probe.json"]  # no temporary file left
    assert written["config"] == CONFIG and written["weights"] == "" and written["k"] == 5
    # Deterministic: the CLI (a second model, seeded) gives exactly the numbers of run_probe.
    for feature in ("backbone", "box_head"):
        assert written[feature] == train_to_val[feature] == returned[feature]
    printed = capsys.readouterr().out
    assert "| box_head" in printed and "| backbone" in printed and str(out) in printed

    with pytest.raises(SystemExit) as exc:
        probe.main(["--config-file", CONFIG, "--weights", "", "--test-dataset", "nope_dataset",
                    "--output", str(tmp_path / "never.json"), *cli_opts])
    assert exc.value.code == 2
    assert "'nope_dataset' is not registered" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
