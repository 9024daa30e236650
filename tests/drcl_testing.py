"""Small 2DRCL models and inputs shared by the 2DRCL tests (real detectron2 modules)."""
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import drcl_d2.modeling.drcl  # noqa: F401  (registers DRCL)
from drcl_d2 import add_drcl_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_drcl_cfg(**drcl):
    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-RCNN-FPN.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "DRCL"
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    # From scratch the ResNet needs real normalisation. GroupNorm is per image, so 1 and 2 ranks
    # compute the same thing (detectron2's NaiveSyncBatchNorm computes E[x²]-E[x]² on several
    # ranks but torch's BatchNorm on one, which differ visibly on near-constant maps).
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 128
    cfg.MODEL.DRCL.HCL_QUEUE_SIZE, cfg.MODEL.DRCL.LCL_QUEUE_SIZE = 32, 64
    cfg.MODEL.DRCL.EMBED_DIM = cfg.MODEL.DRCL.MLP_HIDDEN_DIM = 32
    cfg.MODEL.DRCL.DECODER_DIM = 16
    cfg.SOLVER.MAX_ITER = 10
    for k, v in drcl.items():
        setattr(cfg.MODEL.DRCL, k, v)
    return cfg


def build_small_drcl(seed=0, **drcl):
    torch.manual_seed(seed)
    model = build_model(small_drcl_cfg(**drcl))
    model.init_target()
    model.train()
    return model


def synthetic_inputs(num_images, seed=0, size=(96, 128)):
    """Two views with a shared box set per image (2-4 boxes), deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_images):
        n = 2 + i % 3
        xy = torch.rand(n, 2, generator=g) * 40
        wh = 20 + torch.rand(n, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + wh], dim=1)
        out.append({
            "image_id": 1000 * seed + i,
            "image_v1": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8),
            "image_v2": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8),
            "boxes_v1": boxes,
            "boxes_v2": boxes + torch.rand(n, 4, generator=g) * 4,
        })
    return out
