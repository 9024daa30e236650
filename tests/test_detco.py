"""DetCo / MoCo v2 (drcl_d2.modeling.detco, drcl_d2.data.detco_views, drcl_d2.data.image_folder).

Losses against hand-computed values, queues, level weights, the momentum rule, the views and
jigsaw patches, bad input, image folders, and pretrain_net.py end to end with exact resume.
"""
import argparse
import copy
import logging
import math
import os
import pickle
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pretrain_net  # noqa: E402

from drcl_d2 import add_drcl_config  # noqa: E402
from drcl_d2.checkpoint.convert import convert_checkpoint, detect_source  # noqa: E402
from drcl_d2.data.build import build_train_dataset  # noqa: E402
from drcl_d2.data.datasets import register_datasets_from_config  # noqa: E402
from drcl_d2.data.detco_views import DetCoViewMapper  # noqa: E402
from drcl_d2.modeling.detco import DetCo  # noqa: E402

DETCO_CONFIG = os.path.join(ROOT, "configs", "embedded", "detco_R_18_embedded.yaml")
MOCO_CONFIG = os.path.join(ROOT, "configs", "embedded", "moco_v2_R_18_embedded.yaml")
LEVELS = ("res2", "res3", "res4", "res5")


# ---------------------------------------------------------------------------------------------
# Helpers


def make_encoder(norm="BN"):
    """The detectron2 ResNet-18 the DetCo configs build (torchvision layout, nothing frozen)."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = list(LEVELS)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def make_model(norm="BN", **kwargs):
    kwargs.setdefault("queue_size", 16)
    return DetCo(encoder=make_encoder(norm), **kwargs).train()


def make_batch(n=4, view=32, patch=16, seed=0):
    """n mapper-like inputs of random uint8 pixels."""
    g = torch.Generator().manual_seed(seed)

    def px(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    return [{"image_id": i, "view_q": px(3, view, view), "view_k": px(3, view, view),
             "patches_q": px(9, 3, patch, patch), "patches_k": px(9, 3, patch, patch)} for i in range(n)]


def unit(i, dim=8):
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Losses and queues


def test_losses_match_hand_computed_values():
    """Each term uses the right query, key and queue; values are the closed-form InfoNCE."""
    tau, k_size = 0.2, 4
    model = make_model(levels=("res4", "res5"), level_weights=(0.25, 1.0), embed_dim=8,
                       queue_size=k_size, temperature=tau)
    q_g, k_g = unit(0), unit(0)  # identical global query and key
    q_l, k_l = unit(1), (unit(1) + unit(2)) / math.sqrt(2)  # cos(q_l, k_l) = 1/sqrt(2)
    for lvl in ("res4", "res5"):
        model.queue_global[lvl].keys.copy_(torch.stack([unit(3), unit(3), unit(4), unit(4)]))  # orthogonal
        model.queue_local[lvl].keys.copy_(torch.stack([unit(1)] * k_size))  # = q_l
    one = lambda v: {lvl: v[None] for lvl in ("res4", "res5")}  # noqa: E731
    losses = model.contrastive_losses(one(q_g), one(q_l), one(k_g), one(k_l))

    gg = math.log(1 + k_size * math.exp(0 - 1 / tau))  # positive 1/tau, K negatives at 0
    ll = math.log(1 + k_size * math.exp(1 / tau - (1 / math.sqrt(2)) / tau))  # negatives = q_l itself
    gl = math.log(1 + k_size)  # local query vs global key (0) and the global queue (0)
    assert sorted(losses) == sorted(f"loss_{lvl}_{t}" for lvl in ("res4", "res5") for t in ("gg", "ll", "gl"))
    for lvl, w in (("res4", 0.25), ("res5", 1.0)):
        assert losses[f"loss_{lvl}_gg"].item() == pytest.approx(w * gg, rel=1e-5)
        assert losses[f"loss_{lvl}_ll"].item() == pytest.approx(w * ll, rel=1e-5)
        assert losses[f"loss_{lvl}_gl"].item() == pytest.approx(w * gl, rel=1e-5)


def test_moco_v2_has_one_level_and_no_local_branch():
    model = make_model(levels=("res5",), level_weights=(1.0,), local=False)
    assert model.method == "moco_v2" and model.checkpoint_meta()["method"] == "moco_v2"
    assert len(model.local_heads_q) == 0 and len(model.queue_local) == 0
    assert list(model.global_heads_q) == ["res5"]
    head = model.global_heads_q["res5"]
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 512, 128)
    batch = make_batch(2)
    for x in batch:  # MoCo v2 inputs carry no patches
        del x["patches_q"], x["patches_k"]
    losses = model(batch)
    assert list(losses) == ["loss_res5_gg"] and torch.isfinite(losses["loss_res5_gg"])
    detco = make_model()
    assert detco.method == "detco"
    local = detco.local_heads_q["res3"]
    assert (local[0].in_features, local[0].out_features, local[2].out_features) == (9 * 128, 128, 128)


def test_dequeue_and_enqueue_writes_at_the_pointer_and_wraps():
    model = make_model(levels=("res5",), level_weights=(1.0,), embed_dim=8, queue_size=5)
    a = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    before = model.queue_global["res5"].keys.clone()
    model._dequeue_and_enqueue({"res5": a}, {"res5": -a})
    g, l_ = model.queue_global["res5"], model.queue_local["res5"]
    assert torch.equal(g.keys[:3], a) and torch.equal(g.keys[3:], before[3:])
    assert torch.equal(l_.keys[:3], -a)
    assert int(g.ptr) == 3 and int(l_.ptr) == 3 and int(g.num_filled) == 3
    model._dequeue_and_enqueue({"res5": b}, {"res5": -b})
    assert torch.equal(g.keys, torch.stack([b[2], a[1], a[2], b[0], b[1]]))
    assert int(g.ptr) == 1 and int(g.num_filled) == 5
    # The queues are buffers named queue_*: checkpointed, and dropped by drcl-convert.
    names = [k for k in model.state_dict() if k.startswith("queue_")]
    assert "queue_global.res5.keys" in names and "queue_local.res5.ptr" in names


def test_forward_enqueues_the_keys_it_used():
    """After a step, the newest queue rows are this step's keys (positives of the step)."""
    model = make_model(norm="", queue_size=16, momentum=0.0)
    batch = make_batch(3)
    for x in batch:  # key inputs = query inputs, so keys = queries
        x["view_k"], x["patches_k"] = x["view_q"], x["patches_q"]
    model(batch)
    with torch.no_grad():
        views = model._normalize(torch.stack([x["view_q"] for x in batch]))
        patches = model._normalize(torch.stack([x["patches_q"] for x in batch]))
        q_g = model._global_embeddings(model.encoder_q, model.global_heads_q, views)
        q_l = model._local_embeddings(model.encoder_q, model.local_heads_q, patches)
    for lvl in LEVELS:
        assert int(model.queue_global[lvl].ptr) == 3
        torch.testing.assert_close(model.queue_global[lvl].keys[:3], q_g[lvl], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.queue_local[lvl].keys[:3], q_l[lvl], rtol=0, atol=1e-5)


def test_level_weight_zero_removes_exactly_that_levels_loss():
    model = make_model()
    zeroed = copy.deepcopy(model)
    zeroed.level_weights["res3"] = 0.0
    batch = make_batch(2)
    losses, losses_zeroed = model(batch), zeroed(batch)
    total, total_zeroed = sum(losses.values()), sum(losses_zeroed.values())
    res3 = sum(v for k, v in losses.items() if k.startswith("loss_res3_"))
    assert res3.item() > 0
    assert (total - total_zeroed).item() == pytest.approx(res3.item(), rel=1e-5)
    for k, v in losses_zeroed.items():
        if k.startswith("loss_res3_"):
            assert v.item() == 0.0
        else:
            assert v.item() == pytest.approx(losses[k].item(), rel=1e-6)
    # The weights are the configured ones: unweighted res3 terms = weighted / 0.4.
    unweighted = copy.deepcopy(model)
    unweighted.level_weights = {lvl: 1.0 for lvl in LEVELS}
    model2 = copy.deepcopy(model)
    a, b = model2(batch), unweighted(batch)
    for lvl, w in zip(LEVELS, (0.1, 0.4, 0.7, 1.0)):
        assert a[f"loss_{lvl}_gg"].item() == pytest.approx(w * b[f"loss_{lvl}_gg"].item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Key encoder


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_key_encoder_starts_as_query_and_follows_the_momentum_rule():
    m = 0.9
    model = make_model(momentum=m)
    for q_mod, k_mod in model._key_modules():
        for q, k in zip(q_mod.state_dict().values(), k_mod.state_dict().values()):
            assert torch.equal(q, k)
        assert all(not p.requires_grad for p in k_mod.parameters())
    assert [p.requires_grad for p in model.encoder_q.parameters()] == [True] * len(_params(model.encoder_q))

    # An optimizer step moved the query side: one forward applies k' = m k + (1 - m) q first.
    with torch.no_grad():
        for p in list(model.encoder_q.parameters()) + list(model.global_heads_q.parameters()) + \
                list(model.local_heads_q.parameters()):
            p.add_(0.01 * torch.randn_like(p))
    pairs = [(model.encoder_q, model.encoder_k), (model.global_heads_q, model.global_heads_k),
             (model.local_heads_q, model.local_heads_k)]
    old_k = [_params(k) for _, k in pairs]
    new_q = [_params(q) for q, _ in pairs]
    losses = model(make_batch(2))
    sum(losses.values()).backward()
    for (_, k_mod), ks, qs in zip(pairs, old_k, new_q):
        for p, k_old, q in zip(k_mod.parameters(), ks, qs):
            assert torch.equal(p, k_old.mul_(m).add_(q, alpha=1 - m))
            assert p.grad is None
    assert all(p.grad is not None for p in model.encoder_q.parameters())

    # init_target (TargetNetworkHook, after MODEL.WEIGHTS) copies the query side again.
    model.init_target()
    for q_mod, k_mod in pairs:
        for q, k in zip(q_mod.parameters(), k_mod.parameters()):
            assert torch.equal(q, k)


def test_model_weights_load_into_the_query_encoder_by_suffix(tmp_path):
    """online_network().backbone is encoder_q: detectron2 short-name .pkl weights land there only."""
    model = make_model()
    source = make_encoder()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "r18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.state_dict().items()},
                     "__author__": "test", "matching_heuristics": True}, f)
    key_before = _params(model.encoder_k)
    online = model.online_network()
    assert online.backbone is model.encoder_q
    DetectionCheckpointer(online).load(str(path))
    for name, value in source.state_dict().items():
        assert torch.equal(model.encoder_q.state_dict()[name], value), name
    assert all(torch.equal(a, b) for a, b in zip(key_before, model.encoder_k.parameters()))
    assert not any(k.startswith("backbone.") for k in model.state_dict())  # not registered twice


def test_shuffle_is_a_no_op_on_one_process():
    model = make_model()
    images, patches = torch.randn(3, 3, 8, 8), torch.randn(3, 9, 3, 4, 4)
    x, p, idx = model._batch_shuffle_ddp(images, patches)
    assert x is images and p is patches and idx is None
    assert model._batch_unshuffle_ddp(images, None) is images


# ---------------------------------------------------------------------------------------------
# Views and jigsaw patches


def _mapper(**kw):
    args = dict(image_format="RGB", with_patches=True, view_size=48, canvas_size=255, cell_size=85,
                patch_size=64)
    args.update(kw)
    return DetCoViewMapper(**args)


def _write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


@pytest.fixture(scope="module")
def grid_image(tmp_path_factory):
    """300x300 RGB: 3x3 blocks of 100 px, block b has red = 20 + 25 b (recognisable cells)."""
    img = np.zeros((300, 300, 3), np.uint8)
    for b in range(9):
        r, c = divmod(b, 3)
        img[100 * r:100 * (r + 1), 100 * c:100 * (c + 1), 0] = 20 + 25 * b
    return _write(tmp_path_factory.mktemp("grid") / "grid.png", img)


def test_patch_sets_are_9_shuffled_cells_with_a_crop_inside_each(grid_image):
    mapper = _mapper(patch_crop_scale=(1.0, 1.0), color_jitter_prob=0, grayscale_prob=0, blur_prob=0,
                     flip_prob=0)
    img = torch.from_numpy(utils.read_image(grid_image, format="RGB").transpose(2, 0, 1).copy())
    not_identity, crops = 0, set()
    for seed in range(30):
        patches, order = mapper.patch_set(img, np.random.default_rng(seed))
        assert patches.shape == (9, 3, 64, 64) and patches.dtype == torch.uint8
        assert sorted(order.tolist()) == list(range(9))
        # The centre of patch j is inside cell order[j] (>= 32 px from every cell border).
        cells = [int(round((int(p[0, 32, 32]) - 20) / 25)) for p in patches]
        assert cells == order.tolist()
        not_identity += order.tolist() != list(range(9))
        crops.add(tuple(int(p[0].float().mean()) for p in patches))
    assert not_identity >= 29  # identity has probability 1/9! per draw
    assert len(crops) > 1


def test_mapper_outputs_draw_everything_from_rng(tiny_dataset):
    """Shapes; each image its own draws; q and k independent; same seed -> same output whatever
    the global RNGs; the global RNGs are never touched."""
    from drcl_d2.data.datasets import load_lvis_format_json

    dicts = load_lvis_format_json(tiny_dataset["train_json"], tiny_dataset["image_root"])[:2]
    mapper = _mapper()
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    out = mapper(dicts[0], np.random.default_rng([7, 0]))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist() and random.getstate() == py_state
    assert out["view_q"].shape == (3, 48, 48) and out["view_k"].shape == (3, 48, 48)
    assert out["patches_q"].shape == (9, 3, 64, 64) and out["patches_k"].shape == (9, 3, 64, 64)
    assert all(out[k].dtype == torch.uint8 for k in ("view_q", "view_k", "patches_q", "patches_k"))
    assert out["image_id"] == dicts[0]["image_id"]
    assert not torch.equal(out["view_q"], out["view_k"])
    assert not torch.equal(out["patches_q"], out["patches_k"])

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    again = mapper(dicts[0], np.random.default_rng([7, 0]))
    assert_same_tensors(out, again)
    other_position = mapper(dicts[0], np.random.default_rng([7, 1]))
    assert not torch.equal(out["patches_q"], other_position["patches_q"])
    other_image = mapper(dicts[1], np.random.default_rng([7, 1]))
    assert not torch.equal(other_position["patches_q"], other_image["patches_q"])

    bgr = _mapper(image_format="BGR")(dicts[0], np.random.default_rng([7, 0]))
    for k in ("view_q", "view_k", "patches_q", "patches_k"):
        assert torch.equal(bgr[k], out[k].flip(-3))
    moco = _mapper(with_patches=False)(dicts[0], np.random.default_rng([7, 0]))
    assert "patches_q" not in moco and torch.equal(moco["view_q"], out["view_q"])
    ra = _mapper(randaugment_num_ops=2)
    a, b = ra(dicts[0], np.random.default_rng(3)), ra(dicts[0], np.random.default_rng(3))
    assert_same_tensors(a, b)
    assert not torch.equal(a["view_q"], _mapper()(dicts[0], np.random.default_rng(3))["view_q"])


def test_mapper_handles_grayscale_cmyk_tiny_and_unreadable_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    gray = _write(tmp_path / "gray.png", rgb[..., 0], mode="L")
    cmyk_path = str(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("CMYK").save(cmyk_path)
    tiny = _write(tmp_path / "tiny.png", rgb[:3, :5])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")

    # detectron2's read_image converts to 3-channel RGB.
    g = utils.read_image(gray, format="RGB")
    assert g.shape == (40, 50, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 0] == rgb[..., 0]).all()
    c = utils.read_image(cmyk_path, format="RGB")
    assert c.shape == (40, 50, 3)
    assert np.array_equal(c, np.asarray(Image.open(cmyk_path).convert("RGB")))

    mapper = _mapper(color_jitter_prob=0, grayscale_prob=0)
    for i, path in enumerate((gray, cmyk_path, tiny)):
        out = mapper({"file_name": path, "image_id": i}, np.random.default_rng(i))
        assert out["view_q"].shape == (3, 48, 48) and out["patches_k"].shape == (9, 3, 64, 64)
        if path == gray:
            v = out["view_q"]
            assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
    assert mapper({"file_name": str(broken), "image_id": 9}, np.random.default_rng(0)) is None
    assert mapper({"file_name": str(tmp_path / "missing.jpg"), "image_id": 10}, np.random.default_rng(0)) is None


def test_image_folders_register_from_config(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "unlabeled"
    (root / "n01").mkdir(parents=True)
    _write(root / "a.jpg", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _write(root / "n01" / "b.PNG", rng.integers(0, 256, (11, 7), dtype=np.uint8), mode="L")
    Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).convert("CMYK").save(root / "n01" / "c.JPEG")
    (root / "n01" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image")

    cfg = get_cfg()
    add_drcl_config(cfg)
    cfg.DATASETS.IMAGE_FOLDERS = [["test_unlabeled_folder", str(root)]]
    cfg.DATASETS.TRAIN = ("test_unlabeled_folder",)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    assert register_datasets_from_config(cfg) == ["test_unlabeled_folder"]
    assert register_datasets_from_config(cfg) == ["test_unlabeled_folder"]  # idempotent
    dicts = DatasetCatalog.get("test_unlabeled_folder")
    names = [os.path.relpath(d["file_name"], root) for d in dicts]
    assert names == ["a.jpg", "n01/b.PNG", "n01/broken.jpg", "n01/c.JPEG"]
    assert [(d["height"], d["width"]) for d in dicts] == [(20, 30), (11, 7), (None, None), (9, 13)]
    assert [d["image_id"] for d in dicts] == [0, 1, 2, 3] and all(d["annotations"] == [] for d in dicts)
    assert len(build_train_dataset(cfg)) == 4
    mapper = _mapper(view_size=16, canvas_size=48, cell_size=16, patch_size=12)
    outs = [mapper(d, np.random.default_rng(i)) for i, d in enumerate(dicts)]
    assert [o is None for o in outs] == [False, False, True, False]


# ---------------------------------------------------------------------------------------------
# pretrain_net.py end to end


def _opts(ds, out, **over):
    opts = {
        "DATASETS.LVIS_CUSTOM": repr([["tiny_train", ds["train_json"], ds["image_root"]]]),
        "DATASETS.TRAIN": "('tiny_train',)", "MODEL.DEVICE": "cpu",
        "INPUT.DETCO.VIEW_SIZE": "32", "INPUT.DETCO.PATCH_CANVAS_SIZE": "48", "INPUT.DETCO.CELL_SIZE": "16",
        "INPUT.DETCO.PATCH_SIZE": "16", "MODEL.DETCO.QUEUE_SIZE": "16",
        "SOLVER.IMS_PER_BATCH": "2", "SOLVER.MAX_ITER": "3", "SOLVER.CHECKPOINT_PERIOD": "2",
        "DATALOADER.NUM_WORKERS": "0", "SEED": "11", "OUTPUT_DIR": str(out),
    }
    opts.update({k: str(v) for k, v in over.items()})
    return [x for kv in opts.items() for x in kv]


def _args(config, opts, resume=False):
    return argparse.Namespace(config_file=config, opts=opts, resume=resume, eval_only=False, num_gpus=1,
                              num_machines=1, machine_rank=0, dist_url="auto")


def _model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_detco_pretrains_checkpoints_and_resumes_exactly(tiny_dataset, tmp_path, caplog):
    straight = tmp_path / "straight"
    pretrain_net.main(_args(DETCO_CONFIG, _opts(tiny_dataset, straight)))
    assert (straight / "model_0000001.pth").exists() and (straight / "model_final.pth").exists()
    final = _model_state(straight / "model_final.pth")
    # 3 iterations x 2 images in queues of 16.
    assert int(final["queue_global.res2.ptr"]) == 6 and int(final["queue_local.res5.ptr"]) == 6
    assert int(final["queue_local.res3.num_filled"]) == 6
    first = _model_state(straight / "model_0000001.pth")
    assert not torch.equal(first["encoder_q.res5.1.conv2.weight"], final["encoder_q.res5.1.conv2.weight"])

    # Resume from the checkpoint written after 2 iterations and run the third.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "model_0000001.pth", resumed / "model_0000001.pth")
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    caplog.set_level(logging.INFO, logger="drcl_d2")
    pretrain_net.main(_args(DETCO_CONFIG, _opts(tiny_dataset, resumed), resume=True))
    assert any("resumes at iteration 2" in r.getMessage() for r in caplog.records)  # not a fresh start
    assert torch.load(resumed / "model_final.pth", weights_only=False)["iteration"] == 2
    again = _model_state(resumed / "model_final.pth")
    assert again.keys() == final.keys()
    groups = {"encoder_q.": 0, "encoder_k.": 0, "queue_": 0, "global_heads_": 0, "local_heads_": 0}
    for k in final:
        assert torch.equal(final[k], again[k]), k
        for prefix in groups:
            groups[prefix] += k.startswith(prefix)
    assert all(groups.values()), groups

    # drcl-convert recognises the checkpoint and moves the query ResNet only.
    assert detect_source(torch.load(straight / "model_final.pth", weights_only=False))[0] == "detco"
    report = convert_checkpoint(str(straight / "model_final.pth"), str(tmp_path / "detco_r18.pkl"))
    assert report.source == "detco" and report.depth == 18
    assert "stem.conv1.weight" in report.transferred["backbone"]
    assert len(report.transferred["backbone"]) == sum(
        k.startswith("encoder_q.") and not k.endswith("num_batches_tracked") for k in final)


def test_moco_v2_pretrains_on_an_image_folder_with_a_broken_file(tiny_dataset, tmp_path, caplog):
    folder = tmp_path / "folder"
    folder.mkdir()
    images = sorted(os.listdir(os.path.join(tiny_dataset["image_root"], "train2017")))[:2]
    for name in images:
        shutil.copy(os.path.join(tiny_dataset["image_root"], "train2017", name), folder / name)
    (folder / "000_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "moco"
    opts = _opts(tiny_dataset, out, **{"DATASETS.IMAGE_FOLDERS": repr([["moco_test_folder", str(folder)]]),
                                       "DATASETS.LVIS_CUSTOM": "[]",
                                       "DATASETS.TRAIN": "('moco_test_folder',)",
                                       "SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 100})
    pretrain_net.main(_args(MOCO_CONFIG, opts))
    final = _model_state(out / "model_final.pth")
    # Each epoch of the 3 files meets the broken one: it is logged and replaced, training goes on.
    skips = [r.getMessage() for r in caplog.records
             if r.name == "drcl_d2.data.seeded_loader" and "000_broken.jpg" in r.getMessage()]
    assert skips and "drawing another image" in skips[0]
    assert int(final["queue_global.res5.ptr"]) == 2 * 2
    assert not any(k.startswith(("local_heads", "queue_local", "global_heads_q.res4")) for k in final)
    assert detect_source(torch.load(out / "model_final.pth", weights_only=False))[0] == "detco"


@pytest.mark.parametrize("config", [DETCO_CONFIG, MOCO_CONFIG], ids=os.path.basename)
def test_paper_and_embedded_configs_build(config):
    """The embedded configs and the ImageNet configs they inherit from hold the paper's values."""
    cfg = get_cfg()
    add_drcl_config(cfg)
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, DetCo) and model.depth == 18 and model.momentum == 0.999
    assert model.temperature == 0.2
    paper = get_cfg()
    add_drcl_config(paper)
    paper.merge_from_file(os.path.join(ROOT, "configs", "pretrain", os.path.basename(config).replace(
        "_R_18_embedded", "_R_50_200ep")))
    assert paper.SOLVER.IMS_PER_BATCH == 256 and paper.SOLVER.BASE_LR == 0.03 and paper.SOLVER.MAX_ITER == 1000913
    assert paper.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR" and paper.SOLVER.WEIGHT_DECAY == 1e-4
    assert paper.MODEL.DETCO.QUEUE_SIZE == 65536 and paper.MODEL.RESNETS.DEPTH == 50
    assert paper.INPUT.DETCO.VIEW_SIZE == 224 and tuple(paper.DATASETS.TEST) == ()
    if "detco" in config:
        assert paper.MODEL.DETCO.LEVEL_WEIGHTS == [0.1, 0.4, 0.7, 1.0] and paper.MODEL.DETCO.LOCAL
        sizes = paper.INPUT.DETCO
        assert (sizes.PATCH_CANVAS_SIZE, sizes.CELL_SIZE, sizes.PATCH_SIZE) == (255, 85, 64)
    else:
        assert paper.MODEL.DETCO.LEVELS == ["res5"] and not paper.MODEL.DETCO.LOCAL
