"""Tests a plausible wrong variant of the method would fail (issue 16's mutation check).

Each test feeds inputs on which the wrong variant gives a different answer than the right one, and
checks against an independent computation: swapped or same-view pairings in HCL / LCL, a contiguous id
map built in another order, config defaults against SPEC, a checkpoint write that fails half-way, a
fresh sampler that starts late, and the evaluator picked for a dataset.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.utils.events import EventStorage
from PIL import Image
from torch import nn

from drcl_d2 import add_drcl_config
from drcl_d2.data.datasets import register_lvis_format
from drcl_d2.data.rebalance import CategoryStatistics, DynamicRepeatFactors
from drcl_d2.data.samplers import (DynamicRepeatFactorTrainingSampler, ResumableRepeatFactorTrainingSampler,
                                   ResumableTrainingSampler)
from drcl_d2.engine.checkpoint import AtomicDetectionCheckpointer
from drcl_d2.engine.trainer import build_evaluator
from drcl_d2.modeling.momentum import momentum_update

from drcl_testing import build_small_drcl, synthetic_inputs

TAU = 0.2


def _nce(q, k, queue):
    """-log softmax of the positive q·k against q·queue, averaged (written out, not info_nce)."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / TAU
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


# ---- HCL / LCL pair each view with the OTHER view's target key ----------------------------------
def test_hcl_pairs_each_view_with_the_target_key_of_the_other_view():
    model = build_small_drcl(LCL_WEIGHT=0.0, AR_WEIGHT=0.0, SR_WEIGHT=0.0, RPN_WEIGHT=0.0)
    inputs = synthetic_inputs(3)  # the two views of an image are different images here
    queue = model.queue_hcl.keys.clone()
    with EventStorage(0):
        loss = model(inputs)["loss_hcl"]
    with torch.no_grad():
        im1, im2 = model._images(inputs, "image_v1").tensor, model._images(inputs, "image_v2").tensor
        pool = lambda feats: feats["p5"].mean(dim=(2, 3))  # noqa: E731  (96x128 images: no padding)
        z = F.normalize(model.hcl_predictor(model.hcl_projector(
            torch.cat([pool(model.backbone(im1)), pool(model.backbone(im2))]))), dim=1)
        k = F.normalize(model.target.hcl_projector(
            torch.cat([pool(model.target.backbone(im1)), pool(model.target.backbone(im2))])), dim=1)
    z1, z2, k1, k2 = z[:3], z[3:], k[:3], k[3:]
    cross = 0.5 * (_nce(z1, k2, queue) + _nce(z2, k1, queue))
    same = 0.5 * (_nce(z1, k1, queue) + _nce(z2, k2, queue))
    assert loss.item() == pytest.approx(cross.item(), rel=1e-4)
    assert abs(same.item() - cross.item()) > 1e-2  # the wrong pairing is distinguishable here


def test_lcl_pairs_each_box_with_the_same_box_of_the_other_view():
    model = build_small_drcl(HCL_WEIGHT=0.0, AR_WEIGHT=0.0, SR_WEIGHT=0.0, RPN_WEIGHT=0.0)
    inputs = synthetic_inputs(2)  # 2 + 3 boxes, the view-2 boxes shifted
    queue = model.queue_lcl.keys.clone()
    with EventStorage(0):
        loss = model(inputs)["loss_lcl"]
    boxes_1 = [x["boxes_v1"] for x in inputs]
    boxes_2 = [x["boxes_v2"] for x in inputs]
    with torch.no_grad():
        im1, im2 = model._images(inputs, "image_v1").tensor, model._images(inputs, "image_v2").tensor
        box = torch.cat([model.roi_heads(model.backbone(im1), boxes_1), model.roi_heads(model.backbone(im2), boxes_2)])
        q = F.normalize(model.lcl_predictor(model.lcl_projector(box)), dim=1)
        t = model.target
        box_t = torch.cat([t.roi_heads(t.backbone(im1), boxes_1), t.roi_heads(t.backbone(im2), boxes_2)])
        k = F.normalize(t.lcl_projector(box_t), dim=1)
    m = 5
    q1, q2, k1, k2 = q[:m], q[m:], k[:m], k[m:]

    def batch_nce(q, keys):  # positive: the same box index; negatives: the other boxes + queue
        logits = torch.cat([q @ keys.t(), q @ queue.t()], dim=1) / TAU
        return (torch.logsumexp(logits, 1) - logits[torch.arange(m), torch.arange(m)]).mean()

    cross = 0.5 * (batch_nce(q1, k2) + batch_nce(q2, k1))
    same = 0.5 * (batch_nce(q1, k1) + batch_nce(q2, k2))
    shifted = 0.5 * (batch_nce(q1, k2.roll(1, 0)) + batch_nce(q2, k1.roll(1, 0)))  # off by one box
    assert loss.item() == pytest.approx(cross.item(), rel=1e-4)
    assert abs(same.item() - cross.item()) > 1e-2 and abs(shifted.item() - cross.item()) > 1e-2


def test_ema_moves_the_target_towards_the_online_network():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    momentum_update(online, target, 0.9)
    for name, value in target.state_dict().items():  # target <- 0.9 target + 0.1 online
        expected = 0.9 * before[name] + 0.1 * online.state_dict()[name]
        assert torch.allclose(value, expected)
    assert not torch.equal(online.weight, target.weight)  # the online side is never touched


def test_sr_stops_gradients_on_the_target_side_only():
    model = build_small_drcl(HCL_WEIGHT=0.0, LCL_WEIGHT=0.0, AR_WEIGHT=0.0, RPN_WEIGHT=0.0)
    with EventStorage(0):
        loss = model(synthetic_inputs(2))["loss_sr"]
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert model.decoder.predict.weight.grad.abs().sum() > 0  # through M(g(f(x)))
    assert model.backbone.bottom_up.res3[0].conv1.weight.grad.abs().sum() > 0  # stem, res2 frozen here


# ---- category id maps: non-contiguous ids ----------------------------------------------------
def test_non_contiguous_category_ids_map_back_to_their_dataset_ids(tmp_path):
    """ids 20 and 10 (listed in that order), one category per image: the loader's labels, the
    metadata's map (what LVISEvaluator uses to map results back) and thing_classes must agree."""
    images, anns = [], []
    for i, cat in enumerate([20, 10, 20, 10], start=1):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32})
        anns.append({"id": i, "image_id": i, "category_id": cat, "bbox": [4, 4, 10, 10], "area": 100,
                     "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]], "iscrowd": 0})
    categories = [{"id": 20, "name": "twenty", "frequency": "f"}, {"id": 10, "name": "ten", "frequency": "r"}]
    path = tmp_path / "noncontiguous.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    name = "test_noncontiguous_ids"
    register_lvis_format(name, str(path), str(tmp_path))
    dicts = DatasetCatalog.get(name)  # the loader's parse records the metadata
    meta = MetadataCatalog.get(name)
    dataset_to_label = meta.thing_dataset_id_to_contiguous_id
    assert dataset_to_label == {10: 0, 20: 1}  # sorted ids, as detectron2 maps LVIS / COCO
    assert meta.thing_classes == ["ten", "twenty"]
    label_to_dataset = {v: k for k, v in dataset_to_label.items()}
    by_image = {a["image_id"]: a["category_id"] for a in anns}
    for d in dicts:
        (obj,) = d["annotations"]
        assert label_to_dataset[obj["category_id"]] == by_image[d["image_id"]], d["image_id"]


# ---- config defaults against SPEC ----------------------------------------------------------------
def test_config_defaults_are_specs():
    cfg = add_drcl_config(get_cfg())
    detco, drcl, two_view = cfg.MODEL.DETCO, cfg.MODEL.DRCL, cfg.INPUT.TWO_VIEW
    # DetCo / MoCo v2 (SPEC §3): res2..res5 with w = [0.1, 0.4, 0.7, 1.0], 128-d, K 65536, tau 0.2, m 0.999.
    assert list(detco.LEVELS) == ["res2", "res3", "res4", "res5"]
    assert list(detco.LEVEL_WEIGHTS) == [0.1, 0.4, 0.7, 1.0]
    assert (detco.EMBED_DIM, detco.QUEUE_SIZE, detco.TEMPERATURE, detco.MOMENTUM) == (128, 65536, 0.2, 0.999)
    assert detco.LOCAL and detco.SHUFFLE_BN
    assert (cfg.INPUT.DETCO.VIEW_SIZE, tuple(cfg.INPUT.DETCO.VIEW_SCALE)) == (224, (0.2, 1.0))
    assert (cfg.INPUT.DETCO.PATCH_CANVAS_SIZE, cfg.INPUT.DETCO.CELL_SIZE, cfg.INPUT.DETCO.PATCH_SIZE) == (255, 85, 64)
    # 2DRCL (SPEC §2).
    assert (drcl.TEMPERATURE, drcl.HCL_QUEUE_SIZE, drcl.LCL_QUEUE_SIZE) == (0.2, 16384, 65536)
    assert (drcl.MLP_HIDDEN_DIM, drcl.EMBED_DIM, drcl.MOMENTUM) == (256, 256, 0.996)
    assert (drcl.SR_PATCH_SIZE, drcl.SR_MASK_RATIO, drcl.DECODER_STRIDE) == (32, 0.5, 4)
    assert all(getattr(drcl, f"{t}_WEIGHT") == 1.0 for t in ("HCL", "LCL", "AR", "SR", "RPN"))
    assert two_view.NUM_BOXES == 8
    # Dynamic Rebalancing (SPEC §1).
    assert cfg.DATALOADER.DRB.INSTANCE_FREQUENCY == "fraction_of_instances"


def test_models_built_from_default_config_use_the_spec_level_weights():
    from drcl_d2.modeling.detco import DetCo

    cfg = add_drcl_config(get_cfg())
    assert DetCo.from_config(_detco_cfg(cfg))["level_weights"] == [0.1, 0.4, 0.7, 1.0]


def _detco_cfg(cfg):
    cfg.MODEL.META_ARCHITECTURE = "DetCo"
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.DEVICE = 0, "cpu"
    return cfg


# ---- checkpoints: a write that fails half-way ---------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated failure in the middle of a checkpoint write")


class _FailingState:
    """A checkpointable whose state makes torch.save fail after the model's tensors are written."""

    def __init__(self):
        self.fail = False

    def state_dict(self):
        return {"bulk": torch.zeros(200_000), "bad": _Unpicklable()} if self.fail else {"bulk": torch.zeros(1)}

    def load_state_dict(self, state):
        pass


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tmp_path):
    model = nn.Linear(4, 2)
    state = _FailingState()
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path), extra=state)
    ckpt.save("model_final", iteration=1)
    good = torch.load(tmp_path / "model_final.pth", weights_only=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    state.fail = True
    with pytest.raises(RuntimeError, match="simulated failure"):
        ckpt.save("model_final", iteration=2)
    after = torch.load(tmp_path / "model_final.pth", weights_only=False)  # still loadable
    assert after["iteration"] == 1 and torch.equal(after["model"]["weight"], good["model"]["weight"])
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]  # no temporary left


# ---- samplers: a fresh run starts at position 0 --------------------------------------------------
def _dicts():
    return [{"annotations": [{"category_id": 0}] + ([{"category_id": 1}] if i % 7 == 0 else [])}
            for i in range(20)]


def _first(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_fresh_samplers_start_at_the_first_position_of_their_stream():
    n = 24
    uniform = ResumableTrainingSampler(20, total_batch_size=4, seed=5)
    reference = TrainingSampler(20, seed=5)._infinite_indices()
    assert _first(uniform, n) == [next(reference) for _ in range(n)]

    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(_dicts(), 0.5)
    rfs = ResumableRepeatFactorTrainingSampler(factors, total_batch_size=4, seed=5)
    reference = RepeatFactorTrainingSampler(factors, seed=5)._infinite_indices()
    assert _first(rfs, n) == [next(reference) for _ in range(n)]

    drb = DynamicRepeatFactorTrainingSampler(
        DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(_dicts()), repeat_thresh=0.5),
        total_batch_size=4, max_iter=40, period=5, seed=5)
    assert _first(drb, 20) == drb.period_indices(0).tolist()  # period 0, position 0 onwards


# ---- the evaluator follows the dataset -----------------------------------------------------------
def test_lvis_format_datasets_get_the_lvis_evaluator_and_coco_ones_cocos(tiny_dataset, tmp_path):
    from detectron2.data.datasets import register_coco_instances

    cfg = add_drcl_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path)
    register_lvis_format("test_evaluator_pick_lvis", tiny_dataset["val_json"], tiny_dataset["image_root"])
    assert type(build_evaluator(cfg, "test_evaluator_pick_lvis")) is LVISEvaluator
    # The same annotations as a COCO-format dataset (COCO needs iscrowd; LVIS has none).
    data = json.load(open(tiny_dataset["val_json"]))
    for ann in data["annotations"]:
        ann["iscrowd"] = 0
    coco_json = tmp_path / "coco_format.json"
    coco_json.write_text(json.dumps(data))
    register_coco_instances("test_evaluator_pick_coco", {}, str(coco_json), tiny_dataset["image_root"])
    assert type(build_evaluator(cfg, "test_evaluator_pick_coco")) is COCOEvaluator
