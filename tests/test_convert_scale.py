"""The transfer-scale report of drcl-convert, on real detectron2 models and the tiny dataset.

The detector is the embedded Mask R-CNN R-18-FPN (BatchNorm ResNet, 128-channel FPN) on the
session's tiny LVIS-format dataset, resized to 128 px at test time. Checkpoints with known scales
(the fresh model itself; its FPN output convs x10) pin the measurement; the command is run on a
real 2DRCL model saved as pretraining saves it.
"""
import json
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from drcl_d2 import add_drcl_config
from drcl_d2.checkpoint.convert import main
from drcl_d2.checkpoint.scale import check_transfer_scale, format_scale_table, measure_transfer_scale
from drcl_d2.engine.checkpoint import AtomicDetectionCheckpointer
from drcl_testing import build_small_drcl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "configs", "embedded", "mask_rcnn_R_18_FPN_uniform.yaml")
FPN_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
DATASET = "scale_tiny_val"  # registered from DATASETS.LVIS_CUSTOM by the measurement


def _dataset_opts(ds):
    return [
        "DATASETS.LVIS_CUSTOM", repr([[DATASET, ds["val_json"], ds["image_root"]]]),
        "DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{DATASET}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "12",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",  # the images are 128 x 160
    ]


@pytest.fixture(scope="module")
def embedded_cfg(tiny_dataset):
    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file(EMBEDDED)
    cfg.merge_from_list(_dataset_opts(tiny_dataset) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


@pytest.fixture(scope="module")
def fresh_state(embedded_cfg):
    """The state dict measure_transfer_scale's fresh model has (seed 0)."""
    torch.manual_seed(0)
    return build_model(embedded_cfg).state_dict()


def _save_pth(path, state):
    torch.save({"model": state, "__author__": "drcl_d2"}, path)  # full names: loaded by exact name
    return str(path)


def test_the_fresh_model_itself_measures_ratio_one(tmp_path, embedded_cfg, fresh_state):
    weights = _save_pth(tmp_path / "fresh.pth", fresh_state)
    rng_before = torch.random.get_rng_state()
    result = measure_transfer_scale(embedded_cfg, weights, num_images=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched

    assert result["dataset"] == DATASET and result["arch"] == "fpn"
    assert result["num_images"] == 3 and result["num_boxes"] >= 3
    assert all(max(size) <= 160 and min(size) <= 128 for size in result["input_sizes"])
    assert list(result["fresh"]["features"]) == FPN_LEVELS
    for level in FPN_LEVELS:
        assert result["fresh"]["features"][level]["std"] > 0
        assert result["ratio"]["features"][level]["std"] == pytest.approx(1.0, abs=1e-4)
        assert result["ratio"]["features"][level]["channel_mean_spread"] == pytest.approx(1.0, abs=1e-4)
    for key in ("fc7_norm", "cls_logit_std", "cls_logit_max_abs", "rpn_objectness_std"):
        assert result["fresh"][key] > 0
        assert result["ratio"][key] == pytest.approx(1.0, abs=1e-4)
    assert check_transfer_scale(result) == []
    json.dumps(result)  # serialisable as it is

    table = format_scale_table(result)
    assert f"transfer scale on 3 images ({result['num_boxes']} ground-truth boxes) of {DATASET}" in table
    assert "BatchNorm uses the batch statistics" in table
    for row in ("FPN p2 std", "FPN p6 channel-mean spread", "box head fc7 L2 norm / box",
                "classifier max |logit|", "RPN objectness logit std"):
        assert row in table, row


def test_fpn_outputs_times_ten_are_measured_and_warned(tmp_path, embedded_cfg, fresh_state):
    # The embedded FPN ends in BatchNorm: scaling its affine weight and bias scales every output
    # map exactly (train-mode BN: gamma * x_hat + beta).
    assert embedded_cfg.MODEL.FPN.NORM == "BN"
    is_fpn_affine = lambda k: k.startswith("backbone.fpn_output") and k.endswith((".norm.weight", ".norm.bias"))  # noqa: E731
    scaled = {k: v * 10 if is_fpn_affine(k) else v.clone() for k, v in fresh_state.items()}
    assert sum(is_fpn_affine(k) for k in scaled) == 8  # p2..p5 weight + bias
    result = measure_transfer_scale(embedded_cfg, _save_pth(tmp_path / "x10.pth", scaled), num_images=3)

    for level in FPN_LEVELS:  # p6 is max-pooled from p5
        assert result["ratio"]["features"][level]["std"] == pytest.approx(10.0, rel=1e-4)
    # The RPN head is linear up to its ReLU (zero-initialised biases): it sees exactly 10x; the
    # conv box head normalises its input with BN, so fc7 keeps its scale.
    assert result["ratio"]["rpn_objectness_std"] == pytest.approx(10.0, rel=1e-3)
    assert result["ratio"]["fc7_norm"] == pytest.approx(1.0, rel=1e-3)

    warnings = check_transfer_scale(result)
    for level in FPN_LEVELS:
        assert any(w.startswith(f"FPN {level}: output std ratio converted/fresh 10 is outside [0.8, 1.2]")
                   for w in warnings), level
    assert not any(w.startswith("box head fc7") for w in warnings)
    if result["converted"]["cls_logit_max_abs"] >= 2:
        assert any(w.startswith("box predictor:") for w in warnings)
    assert len(warnings) == len(FPN_LEVELS) + (result["converted"]["cls_logit_max_abs"] >= 2)


def test_a_grown_box_head_is_warned(tmp_path, embedded_cfg, fresh_state):
    """fc7 x10 (the last fc's weight and bias): the ratio and the warning say so."""
    scaled = {k: v * 10 if k.startswith("roi_heads.box_head.fc1.") else v.clone() for k, v in fresh_state.items()}
    result = measure_transfer_scale(embedded_cfg, _save_pth(tmp_path / "fc7x10.pth", scaled), num_images=3)
    assert result["ratio"]["fc7_norm"] == pytest.approx(10.0, rel=1e-4)
    assert result["ratio"]["cls_logit_std"] == pytest.approx(10.0, rel=1e-4)
    warnings = check_transfer_scale(result)
    assert any(w.startswith("box head fc7: mean L2 norm per box ratio converted/fresh 10 > 4") for w in warnings)


def _target_yaml(tmp_path, ds):
    """A fine-tuning config for the small 2DRCL model of drcl_testing (R-18, GN, 64-ch FPN)."""
    path = tmp_path / "target.yaml"
    path.write_text(f"""\
_BASE_: "{os.path.join(REPO, 'configs', 'Base-RCNN-FPN.yaml')}"
MODEL:
  WEIGHTS: ""
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, NORM: "GN"}}
  FPN: {{OUT_CHANNELS: 64}}
  ROI_BOX_HEAD: {{FC_DIM: 128}}
  ROI_HEADS: {{NUM_CLASSES: 12}}
DATASETS:
  LVIS_CUSTOM: {json.dumps([[DATASET, ds["val_json"], ds["image_root"]]])}
  TRAIN: ()
  TEST: ("{DATASET}",)
INPUT: {{MIN_SIZE_TEST: 128, MAX_SIZE_TEST: 160}}
""")
    return str(path)


def test_command_writes_the_scale_json_of_a_2drcl_checkpoint(tmp_path, tiny_dataset, capsys):
    drcl = build_small_drcl(seed=1)
    checkpointer = AtomicDetectionCheckpointer(drcl, save_dir=str(tmp_path))
    checkpointer.extra_state = {"drcl_d2": drcl.checkpoint_meta()}  # as pretraining saves it
    checkpointer.save("model_final")
    src, out = str(tmp_path / "model_final.pth"), str(tmp_path / "drcl_r18.pkl")
    target = _target_yaml(tmp_path, tiny_dataset)

    assert main([src, out, "--target-config", target, "--scale-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "source: drcl" in printed and "tensors loaded by DetectionCheckpointer, all unchanged" in printed
    assert "transfer scale on 2 images" in printed and f"of {DATASET}" in printed
    assert "FPN p2 std" in printed and "box head fc7 L2 norm / box" in printed
    assert f"wrote {out}.scale.json" in printed

    with open(out + ".scale.json") as f:
        saved = json.load(f)
    assert {"weights", "dataset", "seed", "arch", "num_images", "num_boxes", "image_ids", "input_sizes",
            "normalization", "fresh", "converted", "ratio", "goals", "warnings"} <= set(saved)
    assert saved["weights"] == out and saved["dataset"] == DATASET and saved["num_images"] == 2
    assert list(saved["ratio"]["features"]) == FPN_LEVELS
    # The 2DRCL FPN was transferred: its maps differ from the fresh ones.
    assert all(math.isfinite(saved["ratio"]["features"][lv]["std"]) for lv in FPN_LEVELS)
    assert saved["ratio"]["features"]["p2"]["std"] != pytest.approx(1.0, abs=1e-6)
    # Every warning is printed; warnings never change the exit status.
    assert saved["warnings"] == check_transfer_scale(saved)
    printed_warnings = [ln[len("WARNING: "):] for ln in printed.splitlines() if ln.startswith("WARNING: ")]
    assert printed_warnings == saved["warnings"]

    # A dataset that cannot be loaded: the conversion stands, the outdated numbers go.
    assert main([src, out, "--target-config", target, "--scale-dataset", "no_such_dataset"]) == 0
    printed = capsys.readouterr().out
    assert "transfer scale: not measured: dataset 'no_such_dataset': not registered" in printed
    assert not os.path.exists(out + ".scale.json") and os.path.exists(out)

    # --scale-images 0 switches the measurement off.
    assert main([src, out, "--target-config", target, "--scale-images", "0"]) == 0
    assert "transfer scale" not in capsys.readouterr().out
    assert not os.path.exists(out + ".scale.json")
    with pytest.raises(SystemExit):
        main([src, out, "--scale-dataset", DATASET])  # needs --target-config
    assert "--scale-dataset needs --target-config" in capsys.readouterr().err
