"""pretrain_net.py (2DRCL) end to end on the tiny embedded dataset: checkpoint, crash, exact resume."""
import argparse
import os
import sys

import pytest
import torch
from detectron2.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pretrain_net  # noqa: E402

from drcl_d2.engine.pretrain import PretrainTrainer  # noqa: E402
from drcl_d2.engine.trainer import setup  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "embedded", "drcl_R_18_FPN_embedded.yaml")


def _args(ds, out, resume=False, **over):
    opts = {
        "DATASETS.LVIS_CUSTOM": repr([["tiny_pre_train", ds["train_json"], ds["image_root"]]]),
        "DATASETS.TRAIN": "('tiny_pre_train',)", "MODEL.ROI_HEADS.NUM_CLASSES": "12",
        "INPUT.MIN_SIZE_TRAIN": "(96, 128)", "INPUT.MAX_SIZE_TRAIN": "160",
        "MODEL.FPN.OUT_CHANNELS": "64", "MODEL.ROI_BOX_HEAD.FC_DIM": "128",
        "MODEL.DRCL.HCL_QUEUE_SIZE": "16", "MODEL.DRCL.LCL_QUEUE_SIZE": "64", "MODEL.DRCL.DECODER_DIM": "16",
        "SOLVER.IMS_PER_BATCH": "2", "SOLVER.MAX_ITER": "4", "SOLVER.STEPS": "(3,)", "SOLVER.WARMUP_ITERS": "1",
        "SOLVER.CHECKPOINT_PERIOD": "2", "DATALOADER.NUM_WORKERS": "0", "DATALOADER.DRB.PERIOD": "1",
        "SEED": "11", "PRETRAIN.LOG_PERIOD": "1", "OUTPUT_DIR": str(out), "MODEL.DEVICE": "cpu",
    }
    opts.update({k: str(v) for k, v in over.items()})
    return argparse.Namespace(config_file=CONFIG, opts=[x for kv in opts.items() for x in kv], resume=resume,
                              eval_only=False, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")


class _Crash(HookBase):
    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise RuntimeError("simulated crash")


def _alphas(trainer):
    return {it: v for v, it in trainer.storage.history("drb/alpha").values()}


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre_straight")
    cfg = setup(_args(tiny_dataset, out))
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return {"out": out, "alphas": _alphas(trainer)}


def test_pretrain_writes_full_checkpoints(straight):
    out = straight["out"]
    assert (out / "model_0000001.pth").exists() and (out / "model_final.pth").exists()
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["drcl_d2"] == {"method": "drcl", "depth": 18}
    assert ckpt["iteration"] == 3
    model = ckpt["model"]
    for key in ("backbone.bottom_up.stem.conv1.weight", "target.backbone.bottom_up.stem.conv1.weight",
                "proposal_generator.rpn_head.conv.weight", "roi_heads.box_head.fc1.weight",
                "queue_hcl.keys", "queue_hcl.ptr", "queue_lcl.keys", "decoder.predict.weight"):
        assert key in model, key
    assert int(model["queue_hcl.ptr"]) == (4 * 2 * 2) % 16  # 4 iterations x 2 images x 2 views
    state = ckpt["trainer"]  # DefaultTrainer's state: optimizer, scheduler (LRScheduler hook), sampler
    assert "optimizer" in state["_trainer"] and "LRScheduler" in state["hooks"]
    assert state["hooks"]["TrainingSamplerHook"]["next_position"] == 8
    # The target moved with the online network but is not equal to it (EMA).
    assert not torch.equal(model["backbone.fpn_output2.weight"], model["target.backbone.fpn_output2.weight"])
    assert straight["alphas"] == {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75}


def test_pretrain_logs_the_health_signals(straight):
    """What a falling loss cannot show (SPEC §7), in metrics.json every log period."""
    import json

    lines = [json.loads(line) for line in open(straight["out"] / "metrics.json")]
    logged = [line for line in lines if "health/decoder_active" in line]
    assert len(logged) == 4  # LOG_PERIOD 1: every iteration
    for line in logged:
        assert 0.0 < line["health/decoder_active"] < 1.0
        assert -1.0 <= line["health/recon_corr"] <= 1.0
        for key in ("health/sr_centered", "health/fc7_norm", "health/fpn_p2_std", "health/fpn_p6_std",
                    "health/hcl_self_negatives", "health/lcl_self_negatives"):
            assert key in line, key


def test_short_pretraining_converts_at_the_scale_of_a_fresh_detector(tiny_dataset, tmp_path):
    """Issue 10's transfer goal on a short tiny-set pretraining: FPN std within 0.8-1.2x of a fresh
    detector, fc7 norm <= 4x, largest fresh-classifier logit < 2 (drcl-convert's scale report)."""
    from drcl_d2.checkpoint.convert import convert_checkpoint
    from drcl_d2.checkpoint.scale import check_transfer_scale, measure_transfer_scale

    cfg = setup(_args(tiny_dataset, tmp_path / "pre", **{
        "SOLVER.MAX_ITER": 16, "SOLVER.STEPS": "(12,)", "SOLVER.CHECKPOINT_PERIOD": 100,
        "PRETRAIN.LOG_PERIOD": 8}))
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    out = str(tmp_path / "converted.pkl")
    convert_checkpoint(str(tmp_path / "pre" / "model_final.pth"), out)
    finetune_cfg = os.path.join(ROOT, "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")
    args = argparse.Namespace(config_file=finetune_cfg, resume=False, eval_only=False, num_gpus=1, num_machines=1,
                              machine_rank=0, dist_url="auto", opts=[
                                  "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
                                  "MODEL.ROI_HEADS.NUM_CLASSES", "12", "MODEL.DEVICE", "cpu",
                                  "OUTPUT_DIR", str(tmp_path / "ft"), "INPUT.MIN_SIZE_TEST", "128",
                                  "DATASETS.LVIS_CUSTOM", repr([["tiny_scale_val", tiny_dataset["val_json"],
                                                                 tiny_dataset["image_root"]]]),
                                  "DATASETS.TRAIN", "('tiny_scale_val',)", "DATASETS.TEST", "('tiny_scale_val',)"])
    result = measure_transfer_scale(setup(args), out, num_images=4)
    assert check_transfer_scale(result) == []
    fpn = [v["std"] for k, v in result["ratio"]["features"].items() if k.startswith("p")]
    assert len(fpn) == 5 and all(0.8 <= r <= 1.2 for r in fpn), fpn
    assert result["ratio"]["fc7_norm"] <= 4.0 and result["converted"]["cls_logit_max_abs"] < 2.0
    # The box head did move in pretraining (the check is not on an untouched head).
    assert result["ratio"]["fc7_norm"] != pytest.approx(1.0, abs=1e-3)


def test_resume_equals_the_uninterrupted_run(straight, tiny_dataset, tmp_path):
    cfg = setup(_args(tiny_dataset, tmp_path))
    trainer = PretrainTrainer(cfg)
    trainer.register_hooks([_Crash(at=2)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"

    cfg = setup(_args(tiny_dataset, tmp_path, resume=True))
    resumed = PretrainTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert _alphas(resumed) == {2: 0.5, 3: 0.75}

    a = torch.load(straight["out"] / "model_final.pth", weights_only=False)
    b = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # online and target weights, queues and pointers: bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = (c["trainer"]["_trainer"]["optimizer"]["state"] for c in (a, b))
    assert len(opt_a) == len(opt_b) > 0
    for sa, sb in zip(opt_a.values(), opt_b.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]


def test_pretrain_net_main_runs_from_the_command_line_entry(tiny_dataset, tmp_path):
    pretrain_net.main(_args(tiny_dataset, tmp_path, **{"SOLVER.MAX_ITER": 2, "MODEL.DRCL.SR_WEIGHT": 0.0}))
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 1 and ckpt["drcl_d2"]["method"] == "drcl"


def test_converted_checkpoint_transfers_fpn_rpn_box_head_and_fine_tuning_starts_from_it(straight, tiny_dataset, tmp_path):
    """pretrain -> drcl-convert -> train_net: the detector starts from the pretrained modules."""
    import pickle

    from drcl_d2.checkpoint.convert import main as convert_main
    from drcl_d2.engine import Trainer

    src = torch.load(straight["out"] / "model_final.pth", weights_only=False)["model"]
    out = tmp_path / "drcl_converted.pkl"
    finetune_cfg = os.path.join(ROOT, "configs", "embedded", "mask_rcnn_R_18_FPN_drb.yaml")
    size_opts = ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_HEADS.NUM_CLASSES", "12"]
    assert convert_main([str(straight["out"] / "model_final.pth"), str(out), "--target-config", finetune_cfg,
                         "--opts"] + size_opts) in (0, None)
    converted = pickle.load(open(out, "rb"))["model"]
    for name in ("backbone.fpn_lateral3.weight", "backbone.fpn_output5.norm.bias",
                 "proposal_generator.rpn_head.objectness_logits.weight", "roi_heads.box_head.conv1.weight",
                 "roi_heads.box_head.conv1.norm.weight", "roi_heads.box_head.fc1.weight"):
        assert (converted[name] == src[name].numpy()).all(), name
    assert not any(k.startswith(("target.", "queue_", "hcl_", "lcl_", "decoder.")) for k in converted)

    args = argparse.Namespace(config_file=finetune_cfg, resume=False, eval_only=False, num_gpus=1, num_machines=1,
                              machine_rank=0, dist_url="auto", opts=size_opts + [
                                  "MODEL.WEIGHTS", str(out), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "ft"),
                                  "DATASETS.LVIS_CUSTOM", repr([["tiny_ft_train", tiny_dataset["train_json"],
                                                                 tiny_dataset["image_root"]]]),
                                  "DATASETS.TRAIN", "('tiny_ft_train',)", "DATASETS.TEST", "()",
                                  "INPUT.MIN_SIZE_TRAIN", "(128,)", "SOLVER.IMS_PER_BATCH", "2",
                                  "SOLVER.MAX_ITER", "1", "DATALOADER.NUM_WORKERS", "0"])
    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=False)
    model = trainer.model
    assert torch.equal(model.backbone.fpn_output5.norm.bias, src["backbone.fpn_output5.norm.bias"])
    assert torch.equal(model.backbone.bottom_up.res4[0].conv1.weight, src["backbone.bottom_up.res4.0.conv1.weight"])
    assert torch.equal(model.roi_heads.box_head.fc1.weight, src["roi_heads.box_head.fc1.weight"])
    trainer.train()  # one fine-tuning step from the pretrained weights
    assert not torch.equal(model.roi_heads.box_head.fc1.weight, src["roi_heads.box_head.fc1.weight"])


def test_non_finite_loss_stops_before_the_optimizer_step(tiny_dataset, tmp_path):
    """A non-finite loss stops training with an error before the optimizer step: weights and target keep their
    last good values, nothing non-finite is stored, the last checkpoint is intact."""

    class PoisonAR(HookBase):
        def before_step(self):
            if self.trainer.iter == 1:
                self.trainer.model.loss_weights["ar"] = float("inf")  # loss_ar becomes inf

    cfg = setup(_args(tiny_dataset, tmp_path, **{"SOLVER.CHECKPOINT_PERIOD": 1}))
    trainer = PretrainTrainer(cfg)
    trainer.register_hooks([PoisonAR()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="iteration=1"):
        trainer.train()
    model = trainer.model
    good = torch.load(tmp_path / "model_0000000.pth", weights_only=False)["model"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    state = model.state_dict()
    for key in ("backbone.fpn_output2.weight", "target.backbone.fpn_output2.weight", "roi_heads.box_head.fc1.weight"):
        assert torch.equal(state[key], good[key]), key
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())
