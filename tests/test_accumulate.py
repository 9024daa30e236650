"""SOLVER.ACCUM_STEPS: k micro-batches of B/k images then one optimizer step equal one step of B."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from drcl_d2 import add_drcl_config
from drcl_d2.data.datasets import register_datasets_from_config
from drcl_d2.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@META_ARCH_REGISTRY.register()
class MeanColourRegressor(nn.Module):
    """A detector-shaped model without BatchNorm whose loss is a mean over images: predicts each
    image's number of objects from its mean colour (what accumulation must reproduce exactly)."""

    def __init__(self, cfg):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.register_buffer("device_anchor", torch.zeros(()), persistent=False)

    def forward(self, batched_inputs):
        colour = torch.stack([d["image"].float().mean(dim=(1, 2)) / 255 for d in batched_inputs])  # (N, 3)
        target = torch.tensor([float(len(d["instances"])) for d in batched_inputs])  # (N,)
        error = self.linear(colour).squeeze(1) - target
        return {"loss_count": (error ** 2).mean(), "loss_scale": 0.1 * error.abs().mean()}


def _train(tiny_dataset, tmp_path, accum_steps, iters=4):
    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml"))
    cfg.DATASETS.LVIS_CUSTOM = [["accum_train", tiny_dataset["train_json"], tiny_dataset["image_root"]]]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("accum_train",), ()
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "MeanColourRegressor", "", "cpu"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 12
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 100
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.ASPECT_RATIO_GROUPING = 0, False
    cfg.DATALOADER.DRB.PERIOD = 1
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUM_STEPS = 4, accum_steps
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = iters, 2, (3,)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.CHECKPOINT_PERIOD = 0.5, 0.9, 1000
    cfg.SEED, cfg.OUTPUT_DIR = 5, str(tmp_path / f"accum{accum_steps}")
    register_datasets_from_config(cfg)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = {k: [v for v, _ in trainer.storage.history(k).values()] for k in ("lr", "drb/alpha", "loss_count")}
    return trainer.model.state_dict(), history


def test_accumulated_micro_batches_equal_one_full_batch_step(tiny_dataset, tmp_path):
    full, full_history = _train(tiny_dataset, tmp_path, 1)
    for k in (2, 4):
        accumulated, history = _train(tiny_dataset, tmp_path, k)
        for name in full:
            torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
        # The LR schedule and DRB's alpha count optimizer steps, not micro-batches.
        assert history["lr"] == full_history["lr"] and len(history["lr"]) == 4
        assert history["drb/alpha"] == full_history["drb/alpha"] == [0, 0.25, 0.5, 0.75]
        # The logged loss is the mean over the step's images, as without accumulation.
        torch.testing.assert_close(torch.tensor(history["loss_count"]), torch.tensor(full_history["loss_count"]))
    assert not torch.equal(full["linear.weight"], torch.zeros_like(full["linear.weight"]))


def test_accum_steps_must_divide_the_batch(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(4\) must be divisible by SOLVER.ACCUM_STEPS \(3\)"):
        _train(tiny_dataset, tmp_path, 3)


def test_accumulated_moco_v2_pretraining_equals_one_full_batch_step(tiny_dataset, tmp_path):
    """MoCo v2 without BatchNorm (no norm layers in the ResNet, Shuffle BN off): 2 micro-batches of 2
    images per step give the parameters, key encoder and queues of steps of 4 images. The key encoder
    moves once per step and the keys of both micro-batches enter the queue after the step."""
    import sys

    sys.path.insert(0, ROOT)
    import pretrain_net
    from test_detco import MOCO_CONFIG, _args, _model_state, _opts

    final = {}
    for k in (1, 2):
        out = tmp_path / f"moco_accum{k}"
        pretrain_net.main(_args(MOCO_CONFIG, _opts(tiny_dataset, out, **{
            "SOLVER.IMS_PER_BATCH": 4, "SOLVER.ACCUM_STEPS": k, "MODEL.RESNETS.NORM": "''",
            "MODEL.DETCO.SHUFFLE_BN": False, "SOLVER.CHECKPOINT_PERIOD": 100, "MODEL.DETCO.QUEUE_SIZE": 32})))
        final[k] = _model_state(out / "model_final.pth")
    assert int(final[2]["queue_global.res5.ptr"]) == 3 * 4
    for name, value in final[1].items():
        if value.is_floating_point():
            torch.testing.assert_close(final[2][name], value, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(final[2][name], value), name
