"""Every shipped config merges and builds its model on CPU (catches any typo in a key)."""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import build_roi_heads

from drcl_d2 import add_drcl_config
from drcl_d2.modeling.box_predictor import CLS_LOSS_NAMES, LongTailOutputLayers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
LOSS_NAMES = [n for n in CLS_LOSS_NAMES if n != "softmax_ce"]


def config_loss(path):
    """The classification loss a config's name states (softmax_ce when it names none)."""
    stem = os.path.basename(path)[:-len(".yaml")]
    return next((n for n in LOSS_NAMES if f"_{n}" in stem), "softmax_ce")


# The loss configs differ from the config they inherit from only in the box predictor: their RoI
# heads are built below, the rest of the model is built in full with the config they inherit from
# (one R-50 build each, about 1.7 s on 2 cores, would cost 24 of them ~40 s).
LOSS_CONFIGS = [p for p in CONFIGS if config_loss(p) != "softmax_ce"]
MODEL_CONFIGS = [p for p in CONFIGS if p not in LOSS_CONFIGS]


def load_config(path):
    cfg = get_cfg()
    add_drcl_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def test_configs_are_found():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    for required in ("LVISv1/mask_rcnn_R_50_FPN_2x_rfs.yaml", "LVISv1/mask_rcnn_R_50_FPN_2x_drb.yaml",
                     "LVISv1/faster_rcnn_R_50_FPN_2x_drb.yaml", "LVISv1/mask_rcnn_R_101_FPN_2x_drb.yaml",
                     "COCO/mask_rcnn_R_50_FPN_1x.yaml"):
        assert required in names


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_builds_its_model(path):
    cfg = load_config(path)
    model = build_model(cfg)
    assert model.device == torch.device("cpu")
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        assert model.roi_heads.box_predictor.cls_score.out_features == cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
        assert hasattr(model.roi_heads, "mask_head") == cfg.MODEL.MASK_ON
    if "LVISv1" in path and "rcnn" in os.path.basename(path):
        # SPEC §5 settings and the torchvision input convention.
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0001 and cfg.TEST.DETECTIONS_PER_IMAGE == 300
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001 and cfg.SOLVER.MAX_ITER == 180000
        assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
        expected = "DynamicRepeatFactorTrainingSampler" if "_drb" in path else "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.SAMPLER_TRAIN == expected


def test_every_loss_has_lvis_configs_for_both_detectors():
    names = {os.path.basename(p) for p in LOSS_CONFIGS}
    for det in ("faster_rcnn", "mask_rcnn"):
        assert {f"{det}_R_50_FPN_2x_rfs_{n}.yaml" for n in ("sigmoid_bce", "federated", "seesaw", "ecm")} <= names
        assert f"{det}_R_50_FPN_2x_eqlv2.yaml" in names  # EQLv2's paper samples uniformly
        for loss in ("federated", "eqlv2", "seesaw", "ecm"):
            assert {f"{det}_R_50_FPN_2x_drb_{loss}.yaml", f"{det}_R_50_FPN_2x_drb_{loss}_from_2drcl.yaml"} <= names


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_loss_config_builds_its_roi_heads(path):
    cfg = load_config(path)
    loss = config_loss(path)
    assert cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS == loss
    with torch.device("meta"):  # shapes only: the backbone's output shapes, no weights
        shapes = build_backbone(cfg).output_shape()
    predictor = build_roi_heads(cfg, shapes).box_predictor
    assert predictor.cls_score.out_features == 1203 + (2 if loss == "seesaw" else 1)  # Seesaw: 2-way objectness
    assert isinstance(predictor, LongTailOutputLayers) == (loss in ("eqlv2", "seesaw", "ecm"))
    assert getattr(predictor, "use_sigmoid_ce", False) == (loss in ("sigmoid_bce", "federated"))
    # Only what differs is stated: the base config's sampler unless the name says otherwise.
    sampler = {"_drb_": "DynamicRepeatFactorTrainingSampler", "_rfs_": "RepeatFactorTrainingSampler"}
    stem = os.path.basename(path)
    assert cfg.DATALOADER.SAMPLER_TRAIN == next((v for k, v in sampler.items() if k in stem), "TrainingSampler")
    if stem.endswith("_from_2drcl.yaml"):
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM == "SyncBN"  # WEIGHTS cleared by load_config


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def test_configs_state_only_what_differs_from_what_they_inherit():
    """A key whose value equals the inherited one (or detectron2's / drcl_d2's default) hides what a
    config changes; only a root config (no _BASE_) may state VERSION and META_ARCHITECTURE."""
    import yaml
    from detectron2.config import CfgNode

    restated = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        raw = yaml.safe_load(open(path)) or {}
        base = raw.pop("_BASE_", None)
        inherited = add_drcl_config(get_cfg())
        if base:
            inherited.merge_from_file(os.path.join(os.path.dirname(path), base))
        for key, value in _leaves(raw):
            if not base and key in ("VERSION", "MODEL.META_ARCHITECTURE"):
                continue
            node = inherited
            for part in key.split("."):
                node = node[part]
            # decoded as merge_from_file does: "(60000, 80000)" is a tuple
            if _as_tuples(CfgNode._decode_cfg_value(value)) == _as_tuples(node):
                restated.append(f"{os.path.relpath(path, ROOT)}: {key}")
    assert not restated, restated
