"""drcl_d2.tools.plots on the tiny embedded dataset, synthetic metrics.json files and tiny R-18 models.

Real detectron2 and matplotlib throughout; every figure is decoded back with PIL, and the numbers
each function returns are checked against values computed here independently.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data.samplers import RepeatFactorTrainingSampler
from PIL import Image

from drcl_d2.data.datasets import load_lvis_format_json
from drcl_d2.tools import demo, plots, visualize
from drcl_d2.utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")
OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "12", "INPUT.MIN_SIZE_TEST", "128"]
LEVELS = ["p2", "p3", "p4", "p5"]


def _png_size(path):
    """(width, height) of a PNG that PIL decodes completely."""
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def _write_lines(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Two freshly initialised R-18-FPN Mask R-CNNs (different seeds), saved as detectron2 .pth."""
    from detectron2.modeling import build_model

    cfg = load_config(CONFIG, OPTS, device="cpu")
    folder = tmp_path_factory.mktemp("plot_ckpts")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(cfg)
        path = str(folder / f"seed{seed}.pth")
        torch.save({"model": model.state_dict()}, path)
        paths.append(path)
    return {"cfg": cfg, "seed0": paths[0], "seed1": paths[1], "folder": folder}


# ---- longtail -------------------------------------------------------------------------------
def test_longtail_counts_groups_and_repeat_factors(tiny_dataset, tmp_path):
    t = 0.1
    res = plots.plot_longtail(tiny_dataset["train_json"], str(tmp_path / "lt.png"),
                              tiny_dataset["image_root"], repeat_thresh=t)
    w, h = _png_size(res.path)
    assert w > 300 and h > 300
    data = res.data

    raw = json.load(open(tiny_dataset["train_json"]))
    images_of, inst_of = {}, Counter()
    for a in raw["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
        inst_of[a["category_id"]] += 1
    n_images = len({a["image_id"] for a in raw["annotations"]})
    n_inst = sum(inst_of.values())
    ids = data["category_ids"]
    assert sorted(ids) == sorted(c["id"] for c in raw["categories"])
    assert data["num_images"] == n_images
    assert list(data["image_counts"]) == [len(images_of.get(c, ())) for c in ids]
    assert list(data["image_counts"]) == sorted(data["image_counts"], reverse=True)

    json_freq = {c["id"]: c["frequency"] for c in raw["categories"]}
    assert data["frequency_source"] == "json"
    assert data["frequency"] == [json_freq[c] for c in ids]
    assert data["band_counts"] == dict(Counter(json_freq.values()))
    assert data["band_counts"] == {"r": 6, "c": 4, "f": 2}  # the tiny preset's bands

    # α_d = 0 is RFS on image frequencies; α_d = 1 uses the instance fraction.
    r0 = np.array([max(1.0, math.sqrt(t / (len(images_of[c]) / n_images))) for c in ids])
    r1 = np.array([max(1.0, math.sqrt(t / (inst_of[c] / n_inst))) for c in ids])
    np.testing.assert_allclose(data["repeat_factors"][0.0], r0, rtol=1e-12)
    np.testing.assert_allclose(data["repeat_factors"][1.0], r1, rtol=1e-12)
    assert not np.allclose(r0, r1) and (r0 > 1).any()

    # Per image, max over its categories of r_c(0) is detectron2's RFS factor.
    dicts = [d for d in load_lvis_format_json(tiny_dataset["train_json"], tiny_dataset["image_root"])
             if d["annotations"]]
    rfs = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t)
    by_contiguous = {sorted(ids).index(c): r for c, r in zip(ids, data["repeat_factors"][0.0])}
    ours = torch.tensor([max(by_contiguous[a["category_id"]] for a in d["annotations"]) for d in dicts],
                        dtype=torch.float32)
    assert torch.equal(ours, rfs)


def test_longtail_computes_groups_without_frequency_and_names_bad_files(tiny_dataset, tmp_path):
    raw = json.load(open(tiny_dataset["train_json"]))
    for c in raw["categories"]:
        del c["frequency"]
    bare = tmp_path / "no_freq.json"
    bare.write_text(json.dumps(raw))
    data = plots.plot_longtail(str(bare), str(tmp_path / "lt.png"), tiny_dataset["image_root"]).data
    assert data["frequency_source"] == "computed"
    expected = ["r" if n <= 10 else "c" if n <= 100 else "f" for n in data["image_counts"]]
    assert data["frequency"] == expected
    assert data["band_counts"] == dict(Counter(expected))

    missing = str(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        plots.plot_longtail(missing, str(tmp_path / "x.png"))
    no_cats = tmp_path / "no_cats.json"
    no_cats.write_text(json.dumps({"images": raw["images"], "annotations": []}))
    with pytest.raises(ValueError, match=re.escape(str(no_cats)) + ".*categories"):
        plots.plot_longtail(str(no_cats), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


# ---- drb-schedule ---------------------------------------------------------------------------
def test_drb_schedule_reads_values_and_rejects_runs_without_drb(tmp_path):
    metrics = _write_lines(tmp_path / "metrics.json", [
        {"iteration": 9, "total_loss": 2.0},
        {"iteration": 19, "total_loss": 1.5, "drb/alpha": 0.0, "drb/epoch_length": 180.0, "drb/mean_repeat": 1.125},
        {"iteration": 39, "drb/alpha": 0.25, "drb/epoch_length": 190.0, "drb/mean_repeat": 1.1875},
        "",
        {"iteration": 39, "drb/alpha": 0.2, "drb/epoch_length": 188.0, "drb/mean_repeat": 1.175},  # resumed
        {"iteration": 59, "drb/alpha": 0.5, "drb/epoch_length": 205.0, "drb/mean_repeat": 1.28125},
        {"iteration": 59, "bbox/AP": 10.0},
    ])
    res = plots.plot_drb_schedule(str(tmp_path), str(tmp_path / "drb.png"))  # a run folder works too
    assert _png_size(res.path)[0] > 300
    assert res.data["iteration"].tolist() == [19, 39, 59]
    assert res.data["alpha"].tolist() == [0.0, 0.2, 0.5]
    assert res.data["epoch_length"].tolist() == [180.0, 188.0, 205.0]
    assert res.data["mean_repeat"].tolist() == [1.125, 1.175, 1.28125]
    assert res.data["metrics_json"] == metrics

    plain = _write_lines(tmp_path / "rfs.json", [{"iteration": 19, "total_loss": 1.0},
                                                 {"iteration": 39, "bbox/AP": 1.0}])
    with pytest.raises(ValueError, match=re.escape(plain) + ".*DynamicRepeatFactorTrainingSampler"):
        plots.plot_drb_schedule(plain, str(tmp_path / "no.png"))
    assert not (tmp_path / "no.png").exists()


# ---- ap-groups ------------------------------------------------------------------------------
def test_ap_groups_reads_last_evaluation_and_handles_no_detections(tmp_path):
    run_a = tmp_path / "drb"
    run_a.mkdir()
    a_final = {"bbox/AP": 19.4, "bbox/APr": 6.4, "bbox/APc": 21.9, "bbox/APf": 49.5,
               "segm/AP": 21.1, "segm/APr": 5.2, "segm/APc": 28.4, "segm/APf": 48.3}
    _write_lines(run_a / "metrics.json", [
        {"iteration": 99, "bbox/AP": 1.0, "bbox/APr": 0.0},  # an earlier evaluation: superseded
        {"iteration": 100, "total_loss": 0.5},
        dict(iteration=199, **a_final),
    ])
    b_final = {"bbox/AP": 15.0, "bbox/APr": 2.0, "bbox/APc": 18.0, "bbox/APf": 45.0,
               "segm/AP": 14.0, "segm/APr": -100.0, "segm/APc": 17.0, "segm/APf": 44.0}
    b_file = _write_lines(tmp_path / "rfs_metrics.json", [dict(iteration=199, **b_final)])

    res = plots.plot_ap_groups([f"DRB={run_a}", ("RFS", b_file)], str(tmp_path / "ap.png"))
    assert _png_size(res.path)[0] > 300
    data = res.data
    assert data["labels"] == ["DRB", "RFS"] and data["tasks"] == ["bbox", "segm"]
    for label, final in (("DRB", a_final), ("RFS", b_final)):
        for key, value in final.items():
            task, metric = key.split("/")
            assert data["values"][task][label][metric] == value
    assert data["no_detections"] == [("segm", "RFS", "APr")]


def test_ap_groups_names_file_and_line_of_bad_input(tmp_path):
    bad = _write_lines(tmp_path / "bad.json", [{"iteration": 1, "bbox/AP": 1.0}, "{not json"])
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2")):
        plots.plot_ap_groups({"bad": bad}, str(tmp_path / "ap.png"))
    not_object = _write_lines(tmp_path / "list.json", [{"iteration": 1, "bbox/AP": 1.0}, "[1, 2]"])
    with pytest.raises(ValueError, match=re.escape(f"{not_object}:2") + ".*not a JSON object"):
        plots.plot_ap_groups({"x": not_object}, str(tmp_path / "ap.png"))
    with pytest.raises(FileNotFoundError, match="without metrics.json"):
        plots.plot_ap_groups({"empty": str(tmp_path)}, str(tmp_path / "ap.png"))
    with pytest.raises(ValueError, match="distinct"):
        plots.plot_ap_groups([f"a={bad}", f"a={not_object}"], str(tmp_path / "ap.png"))
    assert not (tmp_path / "ap.png").exists()


# ---- attention ------------------------------------------------------------------------------
def test_attention_maps_match_backbone_features(tiny_dataset, tiny_checkpoints, tmp_path):
    ck = tiny_checkpoints
    res = visualize.plot_attention(CONFIG, {"seed0": ck["seed0"], "seed1": ck["seed1"]}, str(tmp_path / "att.png"),
                               dataset_json=tiny_dataset["val_json"], image_root=tiny_dataset["image_root"],
                               num_images=2, opts=OPTS)
    assert _png_size(res.path)[0] > 500
    data = res.data
    assert data["levels"] == LEVELS and len(data["images"]) == 2
    for label in ("seed0", "seed1"):
        rep = data["weights"][label]
        assert rep["backbone_loaded"] == rep["backbone_total"] > 0 and rep["incorrect_shapes"] == {}
    for i, path in enumerate(data["images"]):
        w, h = Image.open(path).size
        for label in ("seed0", "seed1"):
            for lvl in LEVELS:
                m = data["maps"][label][lvl][i]
                assert m.shape == (h, w)
                assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() > 0.5
        assert not np.allclose(data["maps"]["seed0"]["p3"][i], data["maps"]["seed1"]["p3"][i], atol=1e-3)

    # The same map computed here from the model's backbone (128x160 images: no resize, no padding).
    from detectron2.modeling import build_model

    model = build_model(ck["cfg"]).eval()
    model.load_state_dict(torch.load(ck["seed1"])["model"])
    img = np.asarray(Image.open(data["images"][0]).convert("RGB"), dtype=np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1) - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        norm = model.backbone(x[None])["p3"][0].norm(dim=0)
    norm = (norm - norm.min()) / (norm.max() - norm.min())
    expected = F.interpolate(norm[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(data["maps"]["seed1"]["p3"][0], expected.numpy(), atol=1e-5)


def test_attention_reports_pretraining_checkpoint_and_rejects_unrelated_weights(tiny_dataset, tiny_checkpoints,
                                                                             tmp_path):
    ck = tiny_checkpoints
    raw = torch.load(ck["seed0"])
    raw["drcl_d2"] = {"method": "drcl", "depth": 18}  # how this project's pretraining runs are tagged
    raw["model"]["target.backbone.extra"] = torch.zeros(3)  # a key no detector has
    pre = str(tmp_path / "pretrain.pth")
    torch.save(raw, pre)
    img = os.path.join(tiny_dataset["image_root"], json.load(open(tiny_dataset["val_json"]))["images"][0]["file_name"])
    res = visualize.plot_attention(CONFIG, [f"2DRCL={pre}"], str(tmp_path / "att.png"), images=[img],
                               levels=["p5"], opts=OPTS, reduction="mean_abs")
    rep = res.data["weights"]["2DRCL"]
    assert "drcl" in rep["source"] and rep["unexpected"] == 1
    assert rep["backbone_loaded"] == rep["backbone_total"]
    assert res.data["maps"]["2DRCL"]["p5"][0].shape == Image.open(img).size[::-1]

    # A DetCo / MoCo v2 run: ResNet only (the online encoder), so the maps are per ResNet stage.
    from detectron2.modeling import build_model

    detco_cfg = os.path.join(ROOT, "configs", "embedded", "detco_R_18_embedded.yaml")
    torch.manual_seed(0)
    detco = build_model(load_config(detco_cfg, ["INPUT.MIN_SIZE_TEST", "128"], device="cpu"))
    detco_path = str(tmp_path / "detco.pth")
    torch.save({"model": detco.state_dict(), "drcl_d2": detco.checkpoint_meta()}, detco_path)
    res = visualize.plot_attention(detco_cfg, {"DetCo": detco_path}, str(tmp_path / "detco.png"), images=[img],
                               opts=["INPUT.MIN_SIZE_TEST", "128"])
    assert res.data["levels"] == ["res2", "res3", "res4", "res5"]
    rep = res.data["weights"]["DetCo"]
    assert "detco" in rep["source"] and rep["backbone_loaded"] == rep["backbone_total"] > 0
    assert _png_size(res.path)[0] > 300

    junk = str(tmp_path / "junk.pth")
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, junk)
    with pytest.raises(ValueError, match=re.escape(junk) + ".*no backbone tensor"):
        visualize.plot_attention(CONFIG, {"junk": junk}, str(tmp_path / "bad.png"), images=[img], opts=OPTS)
    with pytest.raises(ValueError, match="not outputs of the backbone"):
        visualize.plot_attention(CONFIG, {"a": ck["seed0"]}, str(tmp_path / "bad.png"), images=[img],
                             levels=["res9"], opts=OPTS)
    assert not (tmp_path / "bad.png").exists()


# ---- predictions ----------------------------------------------------------------------------
def test_predictions_draw_thresholded_instances(tiny_dataset, tiny_checkpoints, tmp_path):
    thresh = 0.05  # an untrained 12-class head scores about 1/13: some instances pass
    res = visualize.plot_predictions(CONFIG, tiny_checkpoints["seed0"], str(tmp_path / "pred.png"),
                                 dataset_json=tiny_dataset["val_json"], image_root=tiny_dataset["image_root"],
                                 num_images=2, score_thresh=thresh,
                                 opts=OPTS + ["TEST.DETECTIONS_PER_IMAGE", "10"])  # fewer masks to draw
    assert _png_size(res.path)[0] > 300
    data = res.data
    cats = sorted(json.load(open(tiny_dataset["val_json"]))["categories"], key=lambda c: c["id"])
    assert data["class_names"] == [c["name"] for c in cats]
    (label,) = data["labels"]
    assert sum(len(i["scores"]) for i in data["instances"][label]) > 0  # the checks below see instances
    for path, inst in zip(data["images"], data["instances"][label]):
        w, h = Image.open(path).size
        assert len(inst["scores"]) == len(inst["boxes"]) == len(inst["classes"]) <= 10
        assert (inst["scores"] >= thresh).all()
        assert (inst["classes"] >= 0).all() and (inst["classes"] < 12).all()
        if len(inst["boxes"]):
            assert (inst["boxes"][:, [0, 2]] <= w + 1e-3).all() and (inst["boxes"][:, [1, 3]] <= h + 1e-3).all()

    # A checkpoint without a box predictor (a pretraining run) cannot give predictions.
    sd = {k: v for k, v in torch.load(tiny_checkpoints["seed0"])["model"].items() if "box_predictor" not in k}
    headless = str(tmp_path / "headless.pth")
    torch.save({"model": sd}, headless)
    with pytest.raises(ValueError, match="no trained box predictor"):
        visualize.plot_predictions(CONFIG, headless, str(tmp_path / "bad.png"), images=data["images"][:1], opts=OPTS)


# ---- command line and the demo's entry point ------------------------------------------------
def test_cli_exit_codes(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "metrics.json")
    proc = subprocess.run([sys.executable, "-m", "drcl_d2.tools.plots", "drb-schedule", missing,
                           "--output", str(tmp_path / "o.png")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert missing in proc.stderr and "Traceback" not in proc.stderr

    assert plots.main(["longtail", str(tmp_path / "absent.json"), "--output", str(tmp_path / "o.png")]) == 2
    assert "absent.json" in capsys.readouterr().err
    assert plots.main(["ap-groups", "--run", "noequals_and_missing", "--output", str(tmp_path / "o.png")]) == 2
    assert "noequals_and_missing" in capsys.readouterr().err

    good = _write_lines(tmp_path / "metrics.json", [{"iteration": 5, "bbox/AP": 3.0, "bbox/APr": -100.0}])
    out = str(tmp_path / "ok.png")
    assert plots.main(["ap-groups", "--run", f"A={good}", "--output", out]) == 0
    assert capsys.readouterr().out.strip() == out and _png_size(out)[0] > 0


def test_make_demo_figures_writes_what_its_inputs_allow(tiny_dataset, tiny_checkpoints, tmp_path):
    finetune = tmp_path / "finetune"
    finetune.mkdir()
    _write_lines(finetune / "metrics.json", [
        {"iteration": 19, "drb/alpha": 0.0, "drb/epoch_length": 180.0, "drb/mean_repeat": 1.1},
        {"iteration": 39, "drb/alpha": 0.5, "drb/epoch_length": 200.0, "drb/mean_repeat": 1.2},
        {"iteration": 39, "bbox/AP": 5.0, "bbox/APr": -100.0, "bbox/APc": 3.0, "bbox/APf": 9.0},
    ])
    shutil.copy(tiny_checkpoints["seed0"], finetune / "model_final.pth")
    out_dir = tmp_path / "figures"
    written = demo.make_demo_figures(
        tiny_dataset["train_json"], tiny_dataset["image_root"], str(finetune), str(out_dir), CONFIG,
        {"seed0": tiny_checkpoints["seed0"], "absent": str(tmp_path / "absent.pth")},
        pretrain_dir=str(tmp_path / "no_pretrain"), val_json=tiny_dataset["val_json"], opts=OPTS, num_images=1)
    assert set(written) == {"longtail", "drb_schedule", "ap_groups", "attention", "predictions"}
    for name, path in written.items():
        assert path == str(out_dir / f"{name}.png") and _png_size(path)[0] > 0
    assert sorted(os.listdir(out_dir)) == sorted(f"{n}.png" for n in written)  # no temporary files left
