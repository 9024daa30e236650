"""2DRCL's loss terms: hand-computed values, gradients only where they belong, target and queues."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage

from drcl_d2.modeling.losses import info_nce, info_nce_with_batch_negatives, l2_normalized_mse
from drcl_d2.modeling.momentum import FeatureQueue, cosine_momentum

from drcl_testing import build_small_drcl, synthetic_inputs


def test_info_nce_identical_views_orthogonal_queue():
    tau, k = 0.2, 5
    q = torch.eye(8)[:2]  # two unit queries
    queue = torch.eye(8)[3:3 + k]  # orthogonal to both queries
    expected = math.log(1 + k * math.exp(-1 / tau))  # -log(e^{1/τ} / (e^{1/τ} + K e^0))
    assert info_nce(q, q.clone(), queue, tau).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_with_batch_negatives_hand_case():
    tau = 0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # a third key from another rank
    queue = torch.tensor([[-1.0, 0.0]])
    positives = torch.tensor([0, 1])
    # query 0: logits [1, 0, 1, -1]/τ, positive index 0; query 1: [0, 1, 0, 0]/τ, positive 1.
    l0 = -math.log(math.exp(2) / (2 * math.exp(2) + 1 + math.exp(-2)))
    l1 = -math.log(math.exp(2) / (math.exp(2) + 3))
    got = info_nce_with_batch_negatives(q, keys, positives, queue, tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_l2_normalized_mse_bounds():
    x = torch.randn(2, 8, 3, 3)
    assert l2_normalized_mse(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert l2_normalized_mse(x, -x).item() == pytest.approx(4.0, rel=1e-6)


def test_feature_queue_pointer_wraps_and_refuses_non_finite():
    q = FeatureQueue(5, 2)
    keys = F.normalize(torch.arange(1.0, 15.0).view(7, 2), dim=1)
    q.enqueue(keys[:3])
    assert int(q.ptr) == 3 and torch.equal(q.keys[:3], keys[:3]) and int(q.num_filled) == 3
    q.enqueue(keys[3:7])  # 4 more: slots 3, 4, 0, 1
    assert int(q.ptr) == 2 and int(q.num_filled) == 5
    assert torch.equal(q.keys[[3, 4, 0, 1]], keys[3:7]) and torch.equal(q.keys[2], keys[2])
    before = q.keys.clone()
    q.enqueue(torch.full((2, 2), float("nan")))
    assert torch.equal(q.keys, before) and int(q.ptr) == 2


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_all_terms_finite_and_gradients_only_into_the_online_network():
    model = build_small_drcl()
    queues_before = (model.queue_hcl.keys.clone(), model.queue_lcl.keys.clone())
    with EventStorage(0):
        losses = model(synthetic_inputs(2))
    assert set(losses) == {"loss_hcl", "loss_lcl", "loss_ar", "loss_sr", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert not any(p.requires_grad for p in model.target.parameters())
    for name in ("backbone", "roi_heads", "hcl_projector", "hcl_predictor", "lcl_projector",
                 "lcl_predictor", "decoder", "proposal_generator"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    # The queues advanced by this batch's target keys: 2 images x 2 views; 2+3 boxes x 2 views.
    assert int(model.queue_hcl.ptr) == 4 and int(model.queue_lcl.ptr) == 10
    assert not torch.equal(model.queue_hcl.keys[:4], queues_before[0][:4])
    assert torch.equal(model.queue_hcl.keys[4:], queues_before[0][4:])


def test_each_term_switches_off():
    inputs = synthetic_inputs(2)
    for term, keys in (("HCL_WEIGHT", {"loss_hcl"}), ("LCL_WEIGHT", {"loss_lcl"}), ("AR_WEIGHT", {"loss_ar"}),
                       ("SR_WEIGHT", {"loss_sr"}), ("RPN_WEIGHT", {"loss_rpn_cls", "loss_rpn_loc"})):
        model = build_small_drcl(**{term: 0.0})
        with EventStorage(0):
            losses = model(inputs)
        assert not keys & set(losses) and len(losses) == 6 - len(keys)


def test_loss_weights_scale_their_term():
    inputs = synthetic_inputs(2)
    with EventStorage(0):
        base = build_small_drcl(seed=3)(inputs)
        scaled = build_small_drcl(seed=3, HCL_WEIGHT=2.5, AR_WEIGHT=0.5)(inputs)
    assert scaled["loss_hcl"].item() == pytest.approx(2.5 * base["loss_hcl"].item(), rel=1e-5)
    assert scaled["loss_ar"].item() == pytest.approx(0.5 * base["loss_ar"].item(), rel=1e-5)
    assert scaled["loss_lcl"].item() == pytest.approx(base["loss_lcl"].item(), rel=1e-5)


def test_identical_views_and_fresh_target_give_a_known_hcl_bound():
    """With both views identical, z·z+ is the cosine of prediction vs projection; with an
    orthogonal-free random queue the loss stays below log(1+K)·(1+ε) only if positives align
    at least as well as negatives. Checked exactly: loss equals the formula on the model's own
    embeddings."""
    model = build_small_drcl(LCL_WEIGHT=0.0, AR_WEIGHT=0.0, SR_WEIGHT=0.0, RPN_WEIGHT=0.0)
    inputs = synthetic_inputs(3)
    for x in inputs:
        x["image_v2"], x["boxes_v2"] = x["image_v1"].clone(), x["boxes_v1"].clone()
    queue = model.queue_hcl.keys.clone()
    with EventStorage(0):
        loss = model(inputs)["loss_hcl"]
        images = model._images(inputs, "image_v1")
        feats = model.backbone(images.tensor)
        from drcl_d2.modeling.drcl import _valid_mean

        pooled = _valid_mean(feats["p5"], images.image_sizes, 32)
        z = F.normalize(model.hcl_predictor(model.hcl_projector(pooled)), dim=1)
        k = F.normalize(model.target.hcl_projector(_valid_mean(model.target.backbone(images.tensor)["p5"],
                                                                images.image_sizes, 32)), dim=1)
    logits = torch.cat([(z * k).sum(1, keepdim=True), z @ queue.t()], dim=1) / 0.2
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_target_starts_as_online_and_follows_the_momentum_rule():
    model = build_small_drcl()
    for (name, p_o), p_t in zip(model.backbone.named_parameters(), model.target.backbone.parameters()):
        assert torch.equal(p_o, p_t), name
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)
    online = [p.clone() for p in model.backbone.parameters()]
    target = [p.clone() for p in model.target.backbone.parameters()]
    model.update_target(4)
    m = cosine_momentum(0.996, 5, 10)
    for o, t, new in zip(online, target, model.target.backbone.parameters()):
        assert torch.allclose(new, m * t + (1 - m) * o, atol=1e-7)


def test_appearance_loss_is_zero_for_a_perfect_reconstruction_and_sr_mask_ratio():
    model = build_small_drcl()
    inputs = synthetic_inputs(2)
    images = model._images(inputs, "image_v1")
    perfect = F.avg_pool2d(images.tensor, 4)
    assert model._appearance_loss(perfect, images).item() == pytest.approx(0.0, abs=1e-7)
    assert model._appearance_loss(perfect + 1.0, images).item() == pytest.approx(1.0, rel=1e-6)
    with EventStorage(7):
        mask = model._semantic_mask(inputs, (2, 3, 96, 128))
        again = model._semantic_mask(inputs, (2, 3, 96, 128))
    assert torch.equal(mask, again)  # a function of (image id, iteration)
    assert mask.shape == (2, 1, 96, 128) and set(mask.unique().tolist()) == {0.0, 1.0}
    # 3x4 grid of 32-px patches, ratio 0.5 -> 6 of 12 masked per image
    assert (mask[:, 0, ::32, ::32] == 0).sum(dim=(1, 2)).tolist() == [6, 6]
    assert not torch.equal(mask[0], mask[1])


def test_one_image_with_one_box_per_gpu_trains():
    """Both views share the MLPs' BatchNorm batch, so 1 image (and 1 box) per GPU works."""
    model = build_small_drcl()
    x = synthetic_inputs(1)[0]
    x["boxes_v1"], x["boxes_v2"] = x["boxes_v1"][:1], x["boxes_v2"][:1]
    with EventStorage(0):
        losses = model([x])
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_lcl" in losses
