#!/usr/bin/env python
"""Dynamic Rebalancing at LVIS v1 scale: one DRB recompute vs detectron2's RFS factors.

The statistics are LVIS v1 train's: 100,170 images and the real per-category image counts of
the 1203 categories (shipped in detectron2), with instances spread to about 1.27M. The script
checks DRB at α_d = 0 equals detectron2's RFS bit for bit, times both, and writes
benchmarks/results/rebalance.json and the table in BENCHMARKS.md.

    python benchmarks/bench_rebalance.py [--repeats 5]
Goal (issue): one DRB recompute at least 15x faster than detectron2's RFS computation.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import environment, update_benchmarks_md, write_result  # noqa: E402

from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT  # noqa: E402
from detectron2.data.samplers import RepeatFactorTrainingSampler  # noqa: E402

from drcl_d2.data.rebalance import CategoryStatistics, DynamicRepeatFactors  # noqa: E402

NUM_IMAGES = 100_170
TARGET_INSTANCES = 1_270_000
GOAL = 15.0


def lvis_scale_dataset(seed=0):
    """detectron2 dataset dicts with LVIS v1 train's image counts per category."""
    rng = np.random.default_rng(seed)
    image_idx, cat_ids = [], []
    for cat in LVIS_CATEGORY_IMAGE_COUNT:
        images = rng.choice(NUM_IMAGES, size=cat["image_count"], replace=False)
        image_idx.append(images)
        cat_ids.append(np.full(len(images), cat["id"]))
    image_idx, cat_ids = np.concatenate(image_idx), np.concatenate(cat_ids)
    # Each (image, category) pair holds >= 1 instance; the rest are spread over pairs (long tail).
    extra = TARGET_INSTANCES - len(image_idx)
    per_pair = 1 + rng.multinomial(extra, np.full(len(image_idx), 1 / len(image_idx)))
    image_idx, cat_ids = np.repeat(image_idx, per_pair), np.repeat(cat_ids, per_pair)
    order = np.argsort(image_idx, kind="stable")
    image_idx, cat_ids = image_idx[order], cat_ids[order]
    bounds = np.searchsorted(image_idx, np.arange(NUM_IMAGES + 1))
    dicts = [
        {"image_id": i, "annotations": [{"category_id": int(c)} for c in cat_ids[bounds[i]:bounds[i + 1]]]}
        for i in range(NUM_IMAGES)
    ]
    return dicts


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("detectron2").setLevel(logging.WARNING)  # RFS logs one line per category

    dicts = lvis_scale_dataset()
    num_instances = sum(len(d["annotations"]) for d in dicts)
    t_rfs, rfs = best_of(
        lambda: RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.001), args.repeats
    )
    t_stats, stats = best_of(lambda: CategoryStatistics.from_dataset_dicts(dicts), max(1, args.repeats // 2))
    drb = DynamicRepeatFactors(stats, 0.001)
    t_drb = {a: best_of(lambda a=a: drb(a), args.repeats)[0] for a in (0.0, 0.5, 1.0)}
    equal = bool(torch.equal(drb(0.0), rfs))
    speedup = t_rfs / t_drb[0.5]
    result = {
        "images": NUM_IMAGES,
        "categories": len(LVIS_CATEGORY_IMAGE_COUNT),
        "instances": num_instances,
        "image_category_pairs": int(len(stats.pair_image)),
        "rfs_seconds": t_rfs,
        "drb_statistics_seconds_once": t_stats,
        "drb_recompute_seconds": {str(k): v for k, v in t_drb.items()},
        "speedup_recompute_vs_rfs": speedup,
        "goal_speedup": GOAL,
        "goal_met": speedup >= GOAL,
        "drb_alpha0_equals_rfs_bitwise": equal,
        "mean_repeat": {str(a): float(drb(a).mean()) for a in (0.0, 0.5, 1.0)},
        "env": environment(),
    }
    path = write_result("rebalance", result)
    table = f"""## Dynamic Rebalancing recompute (LVIS v1 scale)

`python benchmarks/bench_rebalance.py` — {NUM_IMAGES:,} images, {result['categories']} categories with LVIS v1's real
image counts, {num_instances:,} instances ({result['image_category_pairs']:,} image-category pairs); best of {args.repeats}; {result['env']['cpu_count']} CPU cores, torch {result['env']['torch']}, commit {result['env']['commit']}.

| what | seconds |
|---|---|
| detectron2 `repeat_factors_from_category_frequency` (RFS) | {t_rfs:.4f} |
| DRB statistics, once per run (`CategoryStatistics.from_dataset_dicts`) | {t_stats:.4f} |
| DRB recompute at α_d = 0 / 0.5 / 1 | {t_drb[0.0]:.4f} / {t_drb[0.5]:.4f} / {t_drb[1.0]:.4f} |
| **speed-up of one recompute over RFS** | **{speedup:.1f}×** (goal ≥ {GOAL:.0f}×: {'met' if speedup >= GOAL else 'MISSED'}) |

DRB at α_d = 0 equals detectron2's RFS factors bit for bit: **{equal}**. Mean r_I at α_d = 0 / 0.5 / 1:
{result['mean_repeat']['0.0']:.3f} / {result['mean_repeat']['0.5']:.3f} / {result['mean_repeat']['1.0']:.3f}.
"""
    update_benchmarks_md("rebalance", table)
    print(table)
    print(f"wrote {path}")
    if not equal:
        sys.exit("DRB at alpha_d = 0 differs from detectron2's RFS factors")


if __name__ == "__main__":
    main()
