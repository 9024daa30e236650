"""Issue 13: the launch-lean step computes what the per-tensor / per-image / per-term code did.

Each fused or vectorised piece against the old maths, written out here as the reference, on fixed
inputs: queue writes (pointer, wrap-around, non-finite keys never stored, pending keys), the fused
momentum update, DetCo's batched InfoNCE terms (losses, gradients, queues over several steps),
2DRCL's masked region code (pooling, AR, SR, RoI pooling) on padded images; the compiled step's
CPU fallback; the Shuffle BN warning.
"""
import copy
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torch import nn

from drcl_d2.modeling.losses import info_nce, l2_normalized_mse, spatially_normalized_mse
from drcl_d2.modeling.momentum import FeatureQueue, MomentumUpdate, write_keys

from drcl_testing import build_small_drcl, synthetic_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_detco import MOCO_CONFIG, make_batch, make_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Queues


def old_enqueue(state: dict, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
    """The FeatureQueue.enqueue of before issue 13 (host reads of the pointer), on a dict of clones."""
    if keys.numel() == 0 or not torch.isfinite(keys).all():
        return
    size = state["keys"].shape[0]
    ids = torch.full((keys.shape[0],), -1, dtype=torch.long) if ids is None else ids
    keys, ids = keys[-size:], ids[-size:]
    n, p = keys.shape[0], int(state["ptr"])
    idx = (torch.arange(n) + p) % size
    state["keys"][idx] = keys
    state["ids"][idx] = ids
    state["ptr"] = torch.tensor((p + n) % size)
    state["num_filled"] = torch.tensor(min(size, int(state["num_filled"]) + n))


def queue_state(queue: FeatureQueue) -> dict:
    return {k: v.clone() for k, v in queue.state_dict().items()}


def test_queue_writes_equal_the_old_enqueue_with_wraps_and_non_finite_batches():
    queue = FeatureQueue(5, 3)
    reference = queue_state(queue)
    g = torch.Generator().manual_seed(0)
    nan_batch = torch.randn(2, 3, generator=g)
    nan_batch[1, 2] = float("nan")
    inf_batch = torch.full((1, 3), float("inf"))
    batches = [torch.randn(3, 3, generator=g), torch.randn(4, 3, generator=g),  # wraps: slots 3, 4, 0, 1
               nan_batch, torch.randn(7, 3, generator=g),  # more keys than slots: the newest 5
               inf_batch, torch.randn(2, 3, generator=g), torch.zeros(0, 3)]
    for step, keys in enumerate(batches):
        ids = torch.arange(10 * step, 10 * step + keys.shape[0])
        queue.push(keys, ids)
        assert queue.pending == (1 if len(keys) else 0)  # written at the next flush or read
        old_enqueue(reference, keys, ids)
        for name, value in queue_state(queue).items():
            assert torch.equal(value, reference[name]), (step, name)
    assert int(queue.ptr) == 4 and int(queue.num_filled) == 5
    assert torch.equal(queue.ids, torch.tensor([35, 36, 50, 51, 34]))  # the NaN / inf batches left no trace


def test_pushed_keys_wait_until_the_queue_is_read_so_backward_can_use_it():
    queue = FeatureQueue(4, 2)
    query = torch.randn(3, 2, requires_grad=True)
    expected = torch.autograd.grad(info_nce(query, query.detach(), queue.keys.clone(), 0.5), query)[0]
    loss = info_nce(query, query.detach(), queue.keys, 0.5)  # no copy of the queue
    queue.push(torch.ones(2, 2))  # this step's keys
    loss.backward()  # the queue under the loss is unchanged
    assert torch.equal(query.grad, expected)
    assert queue.pending == 1
    assert int(queue.ptr) == 2 and queue.pending == 0  # reading a buffer wrote them first
    assert torch.equal(queue.keys[:2], torch.ones(2, 2))


def test_pending_keys_are_in_the_checkpoint_and_dropped_by_a_load():
    queue = FeatureQueue(4, 2)
    saved = queue_state(queue)
    queue.push(torch.ones(3, 2))
    state = queue.state_dict()  # writes the pending keys first
    assert int(state["ptr"]) == 3 and queue.pending == 0 and torch.equal(state["keys"][:3], torch.ones(3, 2))
    queue.push(2 * torch.ones(1, 2))
    queue.load_state_dict(saved)  # the loaded queue supersedes keys pushed before
    queue.flush()
    assert torch.equal(queue.keys, saved["keys"]) and int(queue.ptr) == 0


def test_stacked_queues_write_like_separate_queues_and_skip_only_the_non_finite_one():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(3, 6, 4, generator=g), dim=2)  # Q=3 queues of K=6 keys
    bank_ids = torch.full((3, 6), -1, dtype=torch.long)
    ptr, filled = torch.tensor([0, 2, 5]), torch.tensor([0, 2, 5])
    references = [{"keys": bank[q].clone(), "ids": bank_ids[q].clone(), "ptr": ptr[q].clone(),
                   "num_filled": filled[q].clone()} for q in range(3)]
    for step in range(3):
        keys = torch.randn(3, 4, 4, generator=g)  # 4 new keys per queue
        if step == 1:
            keys[1, 0, 0] = float("nan")  # queue 1 only
        ids = torch.arange(12).view(3, 4) + 100 * step
        write_keys(bank, bank_ids, ptr, filled, keys, ids)
        for q in range(3):
            old_enqueue(references[q], keys[q], ids[q])
            assert torch.equal(bank[q], references[q]["keys"]) and torch.equal(bank_ids[q], references[q]["ids"])
            assert int(ptr[q]) == int(references[q]["ptr"]) and int(filled[q]) == int(references[q]["num_filled"])
    assert ptr.tolist() == [0, 4, 5] and filled.tolist() == [6, 6, 6]  # queue 1 skipped one batch of 4


# ---------------------------------------------------------------------------------------------
# Momentum


def _module():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2))


def test_fused_momentum_update_is_the_per_tensor_rule_bit_for_bit():
    torch.manual_seed(0)
    online, target = _module(), _module()
    online[1].running_mean.normal_()
    online[1].num_batches_tracked.fill_(7)
    expected = copy.deepcopy(target)
    update = MomentumUpdate(lambda: [(online, target)])
    for m in (0.99, 0.5):
        update(m)
        for p_o, p_t in zip(online.parameters(), expected.parameters()):  # the code before issue 13
            p_t.data.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
        for b_o, b_t in zip(online.buffers(), expected.buffers()):
            b_t.copy_(b_o)
        for (name, a), b in zip(target.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(a, b), name
    assert int(target[1].num_batches_tracked) == 7


def test_detco_lists_the_key_encoder_again_after_a_dtype_change():
    model = make_model(levels=("res5",), level_weights=(1.0,), local=False, momentum=0.5)
    model._momentum_update_key_encoder()  # builds the tensor lists
    model.double()  # replaces every tensor
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for p_k, k_old, p_q in zip(model.encoder_k.parameters(), before, model.encoder_q.parameters()):
        assert p_k.dtype == torch.float64 and torch.equal(p_k, k_old * 0.5 + p_q * 0.5)
    # The queues are views of the stacked bank again.
    assert model.queue_global["res5"].keys.data_ptr() == model._bank[0][0].data_ptr()


# ---------------------------------------------------------------------------------------------
# DetCo: batched terms = the per-term InfoNCE of before


def _old_detco_losses(model, batch):
    """One step of the DetCo code before issue 13 on a copy of `model`: per-term InfoNCE against
    queue clones. Returns (losses, gathered keys {("g"|"l", level): (N, 128)})."""
    stack = lambda key: torch.stack([x[key] for x in batch])  # noqa: E731
    q_g = model._global_embeddings(model.encoder_q, model.global_heads_q, model._normalize(stack("view_q")))
    q_l = model._local_embeddings(model.encoder_q, model.local_heads_q, model._normalize(stack("patches_q")))
    with torch.no_grad():
        for q_mod, k_mod in model._key_modules():
            for p_q, p_k in zip(q_mod.parameters(), k_mod.parameters()):
                p_k.mul_(model.momentum).add_(p_q.detach(), alpha=1.0 - model.momentum)
            for b_q, b_k in zip(q_mod.buffers(), k_mod.buffers()):
                b_k.copy_(b_q)
        k_g = model._global_embeddings(model.encoder_k, model.global_heads_k, model._normalize(stack("view_k")))
        k_l = model._local_embeddings(model.encoder_k, model.local_heads_k, model._normalize(stack("patches_k")))
    losses, tau = {}, model.temperature
    for lvl in model.levels:
        w = model.level_weights[lvl]
        queue_g, queue_l = model.queue_global[lvl].keys.clone(), model.queue_local[lvl].keys.clone()
        losses[f"loss_{lvl}_gg"] = w * info_nce(q_g[lvl], k_g[lvl], queue_g, tau)
        losses[f"loss_{lvl}_ll"] = w * info_nce(q_l[lvl], k_l[lvl], queue_l, tau)
        losses[f"loss_{lvl}_gl"] = w * info_nce(q_l[lvl], k_g[lvl], queue_g, tau)
    keys = {("g", lvl): k_g[lvl] for lvl in model.levels} | {("l", lvl): k_l[lvl] for lvl in model.levels}
    return losses, keys


def test_detco_batched_terms_equal_the_per_term_losses_gradients_and_queues_over_steps():
    torch.manual_seed(0)
    model = make_model(queue_size=8, momentum=0.9)  # 3 steps of 4 keys: the queues wrap
    reference_queues = {(kind, lvl): queue_state(q)
                        for kind, qs in (("g", model.queue_global), ("l", model.queue_local)) for lvl, q in qs.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        batch = make_batch(4, seed=step)
        reference = copy.deepcopy(model)
        reference.flush_queues()
        old_losses, old_keys = _old_detco_losses(reference, batch)
        losses = model(batch)
        assert list(losses) == list(old_losses)
        for name, value in losses.items():
            torch.testing.assert_close(value, old_losses[name], rtol=1e-5, atol=1e-6, msg=name)
        opt.zero_grad()
        sum(losses.values()).backward()
        sum(old_losses.values()).backward()
        for (name, p), p_old in zip(model.named_parameters(), reference.parameters()):
            if p.grad is not None or p_old.grad is not None:
                # Relative to the gradient's norm: a convolution's weight gradient sums over every
                # pixel, in an order that depends on the thread count (elements near 0 differ most).
                error = (p.grad - p_old.grad).norm() / p_old.grad.norm().clamp(min=1e-12)
                assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"
        opt.step()
        for key, state in reference_queues.items():
            old_enqueue(state, old_keys[key])
    model.flush_queues()
    for (kind, lvl), state in reference_queues.items():
        queue = (model.queue_global if kind == "g" else model.queue_local)[lvl]
        torch.testing.assert_close(queue.keys, state["keys"], rtol=0, atol=1e-5)
        assert int(queue.ptr) == int(state["ptr"]) == 4 and int(queue.num_filled) == 8


def test_shuffle_bn_warns_once_in_one_process(caplog):
    model = make_model(levels=("res5",), level_weights=(1.0,), local=False)
    batch = make_batch(2)
    with caplog.at_level(logging.WARNING, logger="drcl_d2.modeling.detco"):
        model(batch)
        model(batch)
    assert sum("SHUFFLE_BN does nothing in a single process" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------
# 2DRCL: masked sums over the padded batch = the per-image loops of before


def _padded_inputs():
    """Two images of different sizes, neither a multiple of the strides: padding everywhere."""
    inputs = synthetic_inputs(2, seed=4)
    for x, (h, w) in zip(inputs, ((90, 122), (67, 101))):
        x["image_v1"] = x["image_v1"][:, :h, :w].contiguous()
        x["boxes_v1"] = x["boxes_v1"].clamp(max=min(h, w) - 1)
    inputs[0]["boxes_v1"] = torch.tensor([[2.0, 3.0, 20.0, 17.0], [0.0, 0.0, 85.0, 66.0], [10.0, 5.0, 60.0, 40.0]])
    return inputs


def _ceil_region(h, w, s):
    return max(1, -(-h // s)), max(1, -(-w // s))


def _old_semantic_loss(model, feats, target_1, sizes, norm):
    """SR as before issue 13: per level and image, on the unpadded crop (ceil rule)."""
    distance = spatially_normalized_mse if norm == "spatial" else l2_normalized_mse
    total, centered = 0.0, 0.0
    for level in model.sr_in_features:
        s = model.strides[level]
        for i, (h, w) in enumerate(sizes):
            hs, ws = _ceil_region(h, w, s)
            online, target = feats[level][i:i + 1, :, :hs, :ws], target_1[level][i:i + 1, :, :hs, :ws]
            total = total + distance(online, target) / len(sizes)
            centered = centered + l2_normalized_mse(online - online.mean(dim=(2, 3), keepdim=True),
                                                    target - target.mean(dim=(2, 3), keepdim=True)) / len(sizes)
    return total, centered


@pytest.mark.parametrize("norm", ["spatial", "channel"])
def test_drcl_masked_region_code_equals_the_per_image_loops(norm):
    from drcl_d2.modeling.drcl import _valid_mean

    model = build_small_drcl(SR_NORM=norm)
    inputs = _padded_inputs()
    images = model._images(inputs, "image_v1")
    sizes = images.image_sizes
    assert images.tensor.shape[-2:] == (96, 128) and sizes == [(90, 122), (67, 101)]
    with EventStorage(3):
        feats = model.backbone(images.tensor)
        with torch.no_grad():
            target_1 = model.target.backbone(images.tensor)
        # HCL pooling.
        pooled = _valid_mean(feats["p5"], sizes, 32)
        old_pooled = torch.stack([feats["p5"][i, :, :hs, :ws].mean(dim=(1, 2))
                                  for i, (hs, ws) in enumerate(_ceil_region(h, w, 32) for h, w in sizes)])
        torch.testing.assert_close(pooled, old_pooled, rtol=1e-5, atol=1e-6)
        # SR (and its health signal), values and gradients into the decoder.
        recon = model.decoder(feats)
        health = {}
        loss = model._semantic_loss(recon, images, target_1, inputs, health)
        grad = torch.autograd.grad(loss, recon, retain_graph=True)[0]
        full = F.interpolate(recon, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        masked_feats = model.backbone(full * model._semantic_mask(inputs, full.shape))
        old_loss, old_centered = _old_semantic_loss(model, masked_feats, target_1, sizes, norm)
        old_grad = torch.autograd.grad(old_loss, recon)[0]
    torch.testing.assert_close(loss, old_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(health["sr_centered"], old_centered, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, old_grad, rtol=1e-4, atol=1e-7)
    assert loss.item() > 0.1
    # AR: MSE per image over its unpadded cells at the decoder's stride (the same ceil rule).
    target = F.avg_pool2d(images.tensor, 4)
    old_ar = torch.stack([F.mse_loss(recon[i, :, :hs, :ws], target[i, :, :hs, :ws])
                          for i, (hs, ws) in enumerate(_ceil_region(h, w, 4) for h, w in sizes)]).mean()
    torch.testing.assert_close(model._appearance_loss(recon, images), old_ar, rtol=1e-5, atol=1e-7)


def test_drcl_roi_pooling_without_syncs_equals_detectron2s_pooler():
    model = build_small_drcl()
    inputs = synthetic_inputs(2, size=(160, 224))
    inputs[1]["boxes_v1"] = torch.tensor([[0.0, 0.0, 200.0, 150.0], [4.0, 4.0, 30.0, 20.0]])  # p3 and p2
    images = model._images(inputs, "image_v1")
    boxes = [x["boxes_v1"] for x in inputs]
    feats = model.backbone(images.tensor)
    head = model.roi_heads
    rois, levels = head.box_rois(boxes)
    assert len(set(levels.tolist())) >= 2  # boxes on more than one FPN level
    pooled = head._pool([feats[f] for f in head.in_features], rois, levels)
    expected = head.box_pooler([feats[f] for f in head.in_features], [Boxes(b) for b in boxes])
    assert torch.equal(pooled, expected)
    grads = torch.autograd.grad(pooled.square().sum(), [feats["p2"], feats["p3"]], retain_graph=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), [feats["p2"], feats["p3"]])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# PRETRAIN.COMPILE


def test_compiled_step_falls_back_to_eager_on_cpu(caplog):
    from drcl_d2 import add_drcl_config
    from drcl_d2.engine.pretrain import PretrainTrainer

    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file(MOCO_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.PRETRAIN.COMPILE = True
    with caplog.at_level(logging.WARNING, logger="drcl_d2.engine.pretrain"):
        model = PretrainTrainer.build_model(cfg)
    assert any("PRETRAIN.COMPILE is for GPUs" in r.getMessage() for r in caplog.records)
    assert model.encoder_q._compiled_call_impl is None  # eager
    model.train()
    batch = make_batch(2, view=32)
    for x in batch:
        del x["patches_q"], x["patches_k"]
    assert torch.isfinite(model(batch)["loss_res5_gg"])
    # compile_step (what a GPU gets) compiles in place: checkpoint names unchanged.
    names = list(model.state_dict())
    model.compile_step()
    assert model.encoder_q._compiled_call_impl is not None and list(model.state_dict()) == names
