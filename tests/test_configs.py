"""Every shipped config merges and builds its model on CPU (catches any typo in a key)."""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from drcl_d2 import add_drcl_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
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
