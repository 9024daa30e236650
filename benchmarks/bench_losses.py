#!/usr/bin/env python
"""Per-step cost of each MODEL.ROI_BOX_HEAD.CLS_LOSS against softmax CE, at LVIS v1 scale.

One step of the box predictor as training runs it: classifier + box regressor forward on the RoI
features, `losses()` (classification loss with its statistics update, box regression), backward.
LVIS v1 sizes: 1203 classes, 2 images per GPU x 512 sampled RoIs (25 % foreground, labels drawn from
LVIS v1's image counts), 1024-d box-head features. Federated and ECM get LVIS v1's image counts.
All losses run in one process, interleaved step by step (a load change hits them alike); the ratio
is the median step time over softmax CE's.

    python benchmarks/bench_losses.py [--device cuda] [--steps 50]

Writes benchmarks/results/losses_<device>.json and the "losses_<device>" section of BENCHMARKS.md.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import environment, update_benchmarks_md, write_result  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from drcl_d2 import add_drcl_config  # noqa: E402
from drcl_d2.modeling.box_predictor import CLS_LOSS_NAMES, build_box_predictor  # noqa: E402

NUM_CLASSES, IMAGES, ROIS_PER_IMAGE, FEATURE_DIM, FG_FRACTION = 1203, 2, 512, 1024, 0.25


def lvis_image_counts() -> torch.Tensor:
    return torch.tensor([c["image_count"] for c in sorted(LVIS_CATEGORY_IMAGE_COUNT, key=lambda c: c["id"])],
                        dtype=torch.float64)


def build(loss: str, device: str):
    cfg = add_drcl_config(get_cfg())
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS = loss
    # LVIS v1's image counts where the training set's would be read (federated, ECM).
    counts = {"class_image_counts": lvis_image_counts} if loss in ("federated", "ecm") else {}
    return build_box_predictor(cfg, ShapeSpec(channels=FEATURE_DIM), **counts).to(device)


def batch(device: str, seed: int):
    """RoI features (N, 1024) and per-image proposals with LVIS-like labels."""
    g = torch.Generator().manual_seed(seed)
    counts = lvis_image_counts()
    proposals = []
    for _ in range(IMAGES):
        inst = Instances((800, 1216))
        xy = torch.rand(ROIS_PER_IMAGE, 2, generator=g) * 700
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + 20 + torch.rand(ROIS_PER_IMAGE, 2, generator=g) * 200], 1))
        inst.gt_boxes = Boxes(inst.proposal_boxes.tensor + torch.randn(ROIS_PER_IMAGE, 4, generator=g) * 5)
        labels = torch.multinomial(counts, ROIS_PER_IMAGE, replacement=True, generator=g)
        labels[torch.rand(ROIS_PER_IMAGE, generator=g) > FG_FRACTION] = NUM_CLASSES  # background
        inst.gt_classes = labels
        proposals.append(inst.to(device))
    features = torch.randn(IMAGES * ROIS_PER_IMAGE, FEATURE_DIM, generator=g).to(device)
    return features, proposals


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def predictor_step(predictor, features, proposals):
    """Classifier + regressor forward, losses(), backward into the predictor's weights."""
    predictor.zero_grad(set_to_none=True)
    sum(predictor.losses(predictor(features), proposals).values()).backward()


def loss_step(predictor, predictions, proposals):
    """losses() and its backward alone, from fixed logits / deltas (what the loss itself costs)."""
    logits, deltas = (p.detach().requires_grad_() for p in predictions)
    sum(predictor.losses((logits, deltas), proposals).values()).backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    predictors = {loss: build(loss, args.device) for loss in CLS_LOSS_NAMES}
    times = {(loss, part): [] for loss in CLS_LOSS_NAMES for part in ("predictor", "loss")}
    with EventStorage(0):
        for i in range(args.warmup + args.steps):
            features, proposals = batch(args.device, seed=i)
            for loss, predictor in predictors.items():  # interleaved: the same load for every loss
                with torch.no_grad():
                    predictions = predictor(features)
                whole = timed(lambda: predictor_step(predictor, features, proposals), args.device)
                alone = timed(lambda: loss_step(predictor, predictions, proposals), args.device)
                if i >= args.warmup:
                    times[(loss, "predictor")].append(whole)
                    times[(loss, "loss")].append(alone)
    median = {key: statistics.median(t) for key, t in times.items()}
    rows = {loss: {f"{part}_{stat}": value for part in ("predictor", "loss") for stat, value in (
        ("median_ms", 1000 * median[(loss, part)]),
        ("ratio_to_softmax_ce", median[(loss, part)] / median[("softmax_ce", part)]),
        ("p10_ms", 1000 * sorted(times[(loss, part)])[len(times[(loss, part)]) // 10]),
        ("p90_ms", 1000 * sorted(times[(loss, part)])[len(times[(loss, part)]) * 9 // 10]))}
        for loss in CLS_LOSS_NAMES}
    env = environment()
    name = f"losses_{args.device.split(':')[0]}"
    write_result(name, {"settings": vars(args), "rois": IMAGES * ROIS_PER_IMAGE, "classes": NUM_CLASSES,
                        "rows": rows, "env": env})
    lines = [f"## Per-step cost of the classification losses ({args.device})", "",
             f"`python benchmarks/bench_losses.py --device {args.device}` — at LVIS v1 scale: {NUM_CLASSES} "
             f"classes, {IMAGES} images x {ROIS_PER_IMAGE} RoIs ({FG_FRACTION:.0%} foreground), {FEATURE_DIM}-d "
             f"features. *Predictor step*: classifier + box regressor forward, `losses()`, backward; *loss alone*: "
             f"`losses()` + backward from fixed logits. Median (p10–p90) of {args.steps} interleaved steps, "
             f"{env['torch_threads']} thread(s), commit {env['commit']}.", "",
             "| CLS_LOSS | predictor step ms | × softmax CE | loss alone ms | × softmax CE |", "|---|---|---|---|---|"]
    for loss, r in rows.items():
        lines.append(" | ".join([f"| {loss}"] + [
            f"{r[f'{part}_median_ms']:.2f} ({r[f'{part}_p10_ms']:.2f}–{r[f'{part}_p90_ms']:.2f}) | "
            f"{r[f'{part}_ratio_to_softmax_ce']:.2f}" for part in ("predictor", "loss")]) + " |")
    md = "\n".join(lines)
    update_benchmarks_md(name, md)
    print(md)


if __name__ == "__main__":
    main()
