"""Dynamic Rebalancing math (SPEC §1) against detectron2's RFS and hand-computed cases."""
import math
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler

from drcl_d2.data.rebalance import (
    CategoryStatistics,
    DynamicRepeatFactors,
    alpha_at,
    dynamic_category_frequency,
)


def _random_dataset(num_images=400, num_cats=60, seed=0, empty_fraction=0.1):
    """Long-tailed random detectron2 dicts (some images without annotations)."""
    rng = random.Random(seed)
    weights = [1.0 / (c + 1) ** 1.2 for c in range(num_cats)]
    dicts = []
    for i in range(num_images):
        n = 0 if rng.random() < empty_fraction else rng.randint(1, 8)
        cats = rng.choices(range(num_cats), weights=weights, k=n)
        dicts.append({"image_id": i, "annotations": [{"category_id": c * 3 + 7} for c in cats]})
    return dicts


@pytest.mark.parametrize("thresh", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("sqrt", [True, False])
def test_alpha_zero_equals_detectron2_rfs_exactly(thresh, sqrt):
    dicts = _random_dataset()
    expected = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, thresh, sqrt=sqrt)
    drb = DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(dicts), thresh, sqrt=sqrt)
    got = drb(0.0)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)  # bit for bit
    assert (got > 1).any() and (got == 1).any()  # the case exercises both branches


def test_alpha_one_uses_instance_frequency():
    dicts = _random_dataset(seed=1)
    t = 0.05
    stats = CategoryStatistics.from_dataset_dicts(dicts)
    got = DynamicRepeatFactors(stats, t)(1.0)
    # Independent computation, in plain Python: f_in(c) = #instances of c / #instances.
    counts, total = {}, 0
    for d in dicts:
        for a in d["annotations"]:
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
            total += 1
    r_c = {c: max(1.0, math.sqrt(t / (n / total))) for c, n in counts.items()}
    expected = [max((r_c[a["category_id"]] for a in d["annotations"]), default=1.0) for d in dicts]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32))
    # Instance-level frequencies differ from image-level ones here, so the factors must too.
    assert not torch.equal(got, DynamicRepeatFactors(stats, t)(0.0))


def test_hand_computed_case_and_instances_per_image_mode():
    # 4 images: A in images 0,1 (1 + 3 instances), B in image 1 (1 instance), image 3 empty.
    dicts = [
        {"annotations": [{"category_id": 1}]},
        {"annotations": [{"category_id": 1}] * 3 + [{"category_id": 2}]},
        {"annotations": []},
        {"annotations": []},
    ]
    stats = CategoryStatistics.from_dataset_dicts(dicts)
    assert stats.category_ids.tolist() == [1, 2]
    assert stats.image_counts.tolist() == [2, 1] and stats.instance_counts.tolist() == [4, 1]
    t, alpha = 0.5, 0.25
    # f_im = [2/4, 1/4]; f_in = [4/5, 1/5]
    f_im, f_in = np.array([0.5, 0.25]), np.array([0.8, 0.2])
    f_c = f_im * f_in / (alpha * f_im + (1 - alpha) * f_in)
    r_c = np.maximum(1, np.sqrt(t / f_c))
    got = DynamicRepeatFactors(stats, t)(alpha)
    assert got.tolist() == pytest.approx([r_c[0], max(r_c), 1.0, 1.0])
    assert r_c[1] > 1.0  # the rare category is repeated
    # instances_per_image: f_in = [4/4, 1/4]
    per_image = DynamicRepeatFactors(stats, t, instance_frequency="instances_per_image")
    assert per_image.f_in.tolist() == [1.0, 0.25]


def test_harmonic_mean_endpoints_and_monotone_path():
    f_im, f_in = np.array([0.3, 0.01]), np.array([0.05, 0.2])
    assert np.array_equal(dynamic_category_frequency(f_im, f_in, 0.0), f_im)
    assert np.array_equal(dynamic_category_frequency(f_im, f_in, 1.0), f_in)
    mids = np.stack([dynamic_category_frequency(f_im, f_in, a) for a in np.linspace(0, 1, 11)])
    # f_c moves monotonically from f_im to f_in (decreasing for cat 0, increasing for cat 1)
    assert np.all(np.diff(mids[:, 0]) < 0) and np.all(np.diff(mids[:, 1]) > 0)
    with pytest.raises(ValueError, match="alpha_d"):
        dynamic_category_frequency(f_im, f_in, 1.5)


def test_images_without_annotations_get_factor_one_and_errors():
    dicts = [{"annotations": []}, {"annotations": [{"category_id": 5}]}]
    got = DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(dicts), 0.9)(0.5)
    assert got[0].item() == 1.0 and got[1].item() > 1.0
    with pytest.raises(ValueError, match="non-empty"):
        CategoryStatistics.from_dataset_dicts([])
    with pytest.raises(ValueError, match="INSTANCE_FREQUENCY"):
        DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(dicts), 0.9, instance_frequency="bogus")


def test_alpha_schedule():
    assert alpha_at(0, 100) == 0.0 and alpha_at(50, 100) == 0.5 and alpha_at(150, 100) == 1.0
    with pytest.raises(ValueError, match="MAX_ITER"):
        alpha_at(1, 0)
