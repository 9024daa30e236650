"""DetCo / MoCo v2 on 2 gloo processes (detectron2.engine.launch): Shuffle BN keeps positives aligned.

* the shuffle helpers move each patch set with its image and unshuffle global and local keys;
* a 2-rank step equals a 1-process step on the same global batch (losses, queues), which fails
  if either kind of key were left shuffled;
* pretrain_net.py trains with DDP on 2 processes.
"""
import os
import sys

import torch
from detectron2.engine import launch
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_detco import DETCO_CONFIG, _args, _opts, make_batch, make_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pretrain_net  # noqa: E402

PER_RANK = 4
SHUFFLE_SEED = 5  # torch.randperm(8) under this seed moves images across ranks (checked below)


def _permutation_moves_images_across_ranks():
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(2 * PER_RANK).view(2, PER_RANK)
    return not set(perm[0].tolist()) == set(range(PER_RANK))


def _shuffle_worker(out_dir):
    rank = comm.get_rank()
    model = make_model(norm="")
    ids = torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK)  # global image index
    images = ids.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()  # pixel value = image index
    # Patch j of image i holds 10 i + j.
    patches = (10 * ids.float().view(-1, 1, 1, 1, 1) + torch.arange(9.0).view(1, 9, 1, 1, 1)).expand(
        -1, 9, 3, 2, 2).clone()
    torch.manual_seed(SHUFFLE_SEED if rank == 0 else 999)  # only rank 0's draw may count
    x, p, idx_unshuffle = model._batch_shuffle_ddp(images, patches)
    # "Keys" computed from the shuffled inputs, one per image: which image / patch set it saw.
    k_global = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 2 * PER_RANK).float()
    k_local = torch.nn.functional.one_hot((p[:, 0, 0, 0, 0] // 10).long(), 2 * PER_RANK).float()
    torch.save({
        "image_ids": x[:, 0, 0, 0].long(), "patch_ids": p[:, :, 0, 0, 0].long(), "idx": idx_unshuffle,
        "global": model._batch_unshuffle_ddp(k_global, idx_unshuffle).argmax(1),
        "local": model._batch_unshuffle_ddp(k_local, idx_unshuffle).argmax(1),
    }, os.path.join(out_dir, f"shuffle{rank}.pth"))


def test_shuffle_moves_patch_sets_with_their_image_and_unshuffles_both_keys(tmp_path):
    assert _permutation_moves_images_across_ranks()
    launch(_shuffle_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r = [torch.load(tmp_path / f"shuffle{i}.pth") for i in range(2)]
    seen = torch.cat([r[0]["image_ids"], r[1]["image_ids"]])
    assert sorted(seen.tolist()) == list(range(2 * PER_RANK))  # a permutation of the global batch
    assert set(r[0]["image_ids"].tolist()) != set(range(PER_RANK))  # images changed rank
    assert torch.equal(r[0]["idx"], r[1]["idx"])  # every rank used rank 0's permutation
    for rank, res in enumerate(r):
        # Each shuffled patch set belongs to the shuffled image beside it, its 9 patches in order.
        assert torch.equal(res["patch_ids"] // 10, res["image_ids"].view(-1, 1).expand(-1, 9))
        assert torch.equal(res["patch_ids"] % 10, torch.arange(9).expand(PER_RANK, 9))
        # After unshuffling, key i of this rank came from this rank's image i: global and local.
        own = torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert torch.equal(res["global"], own) and torch.equal(res["local"], own)


def _model_for_step():
    """The same DetCo (no normalisation layers: per-sample keys) on every process."""
    torch.manual_seed(0)
    model = make_model(norm="", queue_size=32, momentum=0.99)
    with torch.no_grad():  # an optimizer step happened: query != key encoder
        for p in list(model.encoder_q.parameters()) + list(model.global_heads_q.parameters()) + \
                list(model.local_heads_q.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return model


def _state_after_step(model, losses):
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "queues": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("queue_")},
        "encoder_k": {k: v.clone() for k, v in model.encoder_k.state_dict().items()},
    }


def _step_worker(out_dir):
    rank = comm.get_rank()
    model = _model_for_step()
    batch = make_batch(2 * PER_RANK, seed=3)[rank * PER_RANK:(rank + 1) * PER_RANK]
    torch.manual_seed(SHUFFLE_SEED if rank == 0 else 999)
    losses = model(batch)
    torch.save(_state_after_step(model, losses), os.path.join(out_dir, f"step{rank}.pth"))


def test_two_rank_step_equals_one_process_step_on_the_global_batch(tmp_path):
    launch(_step_worker, 2, dist_url="auto", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"step{i}.pth") for i in range(2)]
    model = _model_for_step()
    single = _state_after_step(model, model(make_batch(2 * PER_RANK, seed=3)))

    # Per-rank losses are means over 4 images: their average is the mean over the global batch.
    # Every term (gg, ll, gl at every level) matches only when both key kinds are unshuffled.
    assert len(single["losses"]) == 12
    for name, value in single["losses"].items():
        two = (ranks[0]["losses"][name] + ranks[1]["losses"][name]) / 2
        torch.testing.assert_close(two, value, rtol=1e-5, atol=1e-6, msg=name)
    # Queues hold the gathered keys of both ranks, in global order, on every rank.
    for res in ranks:
        for name, value in single["queues"].items():
            torch.testing.assert_close(res["queues"][name], value, rtol=0, atol=1e-5, msg=name)
        assert int(res["queues"]["queue_local.res4.ptr"]) == 2 * PER_RANK
        for name, value in single["encoder_k"].items():
            assert torch.equal(res["encoder_k"][name], value), name


def test_pretrain_net_trains_with_ddp_on_two_processes(tiny_dataset, tmp_path):
    opts = _opts(tiny_dataset, tmp_path, **{"SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": 2,
                                           "SOLVER.CHECKPOINT_PERIOD": 100})
    launch(pretrain_net.main, 2, dist_url="auto", args=(_args(DETCO_CONFIG, opts),))
    assert "World size: 2" in (tmp_path / "log.txt.rank1").read_text()
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    # 2 iterations x global batch 4 (2 per rank), gathered into every queue.
    assert int(final["queue_global.res5.ptr"]) == 8 and int(final["queue_local.res2.ptr"]) == 8
    assert all(torch.isfinite(v).all() for k, v in final.items() if v.is_floating_point())
