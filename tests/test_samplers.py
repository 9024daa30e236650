"""Samplers: determinism, sharding over 2 real gloo ranks, exact resume, α_d schedule."""
import itertools
import json
import os

import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.engine import launch

from drcl_d2.data.rebalance import CategoryStatistics, DynamicRepeatFactors
from drcl_d2.data.samplers import (
    DynamicRepeatFactorTrainingSampler,
    ResumableRepeatFactorTrainingSampler,
    ResumableTrainingSampler,
)

BATCH, MAX_ITER, PERIOD = 4, 40, 5


def _dicts():
    # 30 images; category 0 everywhere, category 1 in 3 images, category 2 once, 2 empty images.
    out = []
    for i in range(30):
        anns = [{"category_id": 0}] * (1 + i % 3)
        if i % 10 == 3:
            anns += [{"category_id": 1}]
        if i == 7:
            anns += [{"category_id": 2}] * 4
        out.append({"annotations": anns if i not in (20, 21) else []})
    return out


def _drb(seed=3, **kw):
    factors = DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(_dicts()), repeat_thresh=0.5)
    return DynamicRepeatFactorTrainingSampler(
        factors, total_batch_size=BATCH, max_iter=MAX_ITER, period=PERIOD, seed=seed, **kw
    )


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_drb_deterministic_for_a_seed():
    assert _take(_drb(seed=3), 200) == _take(_drb(seed=3), 200)
    assert _take(_drb(seed=3), 200) != _take(_drb(seed=4), 200)


def test_drb_resume_continues_the_uninterrupted_stream():
    straight = _take(_drb(), MAX_ITER * BATCH)
    for k in (1, PERIOD, 7, 23):  # inside and at period boundaries
        resumed = _drb()
        resumed.set_start_iter(k)
        assert _take(resumed, (MAX_ITER - k) * BATCH) == straight[k * BATCH:]


def test_drb_alpha_follows_the_iteration_and_factors_change():
    s = _drb()
    alphas = [s.state_at(it).alpha for it in range(MAX_ITER + 10)]
    assert alphas[0] == 0.0 and alphas[PERIOD - 1] == 0.0
    assert alphas[PERIOD] == PERIOD / MAX_ITER and alphas[MAX_ITER] == 1.0 and alphas[-1] == 1.0
    # At α=0 the factors are RFS's; at α=1 they differ (instance frequency of cat 2 is higher).
    rfs = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(_dicts(), 0.5)
    assert torch.equal(s.factors_of_period(0), rfs)
    assert not torch.equal(s.factors_of_period(MAX_ITER // PERIOD), rfs)
    # The sampled frequency of image 7 (rarest category) follows its factor in each period.
    state = s.state_at(0)
    assert state.epoch_length == float(rfs.sum()) and state.mean_repeat == float(rfs.mean())


def test_drb_sampling_frequency_matches_repeat_factors():
    s = DynamicRepeatFactorTrainingSampler(
        DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(_dicts()), 0.5),
        total_batch_size=50, max_iter=10**6, period=2000, seed=0,
    )
    counts = torch.bincount(torch.tensor(_take(s, 50 * 2000)), minlength=30).double()
    factors = s.factors_of_period(0).double()
    expected = factors / factors.sum() * counts.sum()
    assert torch.allclose(counts, expected, rtol=0.05)


def test_uniform_and_rfs_resume_like_drb():
    rfs_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(_dicts(), 0.5)
    for make in (lambda: ResumableTrainingSampler(30, total_batch_size=BATCH, seed=1),
                 lambda: ResumableRepeatFactorTrainingSampler(rfs_factors, total_batch_size=BATCH, seed=1)):
        straight = _take(make(), 100)
        resumed = make()
        resumed.set_start_iter(6)
        assert _take(resumed, 100 - 6 * BATCH) == straight[6 * BATCH:]
    # Without a start iteration they are exactly detectron2's samplers.
    assert _take(ResumableTrainingSampler(30, total_batch_size=BATCH, seed=1), 50) == _take(TrainingSampler(30, seed=1), 50)
    assert _take(ResumableRepeatFactorTrainingSampler(rfs_factors, total_batch_size=BATCH, seed=1), 50) == \
        _take(RepeatFactorTrainingSampler(rfs_factors, seed=1), 50)


def _shard_worker(out_dir, start_iter):
    from detectron2.utils import comm

    s = _drb()
    s.set_start_iter(start_iter)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(_take(s, 60), f)


def test_two_gloo_ranks_get_disjoint_complete_shards(tmp_path):
    launch(_shard_worker, 2, dist_url="auto", args=(str(tmp_path), 3))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    straight = _take(_drb(), 3 * BATCH + 120)[3 * BATCH:]
    # Interleaving the two ranks' streams gives back the single-process global stream:
    # each global position goes to exactly one rank, none is lost or duplicated.
    assert straight[0::2] == r0 and straight[1::2] == r1
