"""kNN probe of a detector's RoI features on ground-truth boxes: how well do they separate categories?

    python -m drcl_d2.tools.probe --config-file CFG --weights W [--train-dataset NAME] [--test-dataset NAME] \
        [--max-train-images N] [--max-test-images N] [--k 20] [--temperature 0.07] [--batch-size 8] \
        [--seed 0] [--output probe.json] [KEY VALUE ...]

The detector of CFG (KEY VALUE pairs override it; DATASETS.LVIS_CUSTOM is registered) gets W: a
converted ``.pkl`` (drcl-convert), a ``model_final.pth``, or ``""`` for a random init seeded with
--seed (the scratch baseline); MODEL.WEIGHTS is not used. The datasets (default DATASETS.TRAIN[0]
and TEST[0]) give their first N images with a ground-truth box, resized as at test time
(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and run in eval mode without gradients, --batch-size at a
time. Every non-crowd ground-truth box gives two features:

* ``backbone``: RoIAlign (7x7, ROI_BOX_HEAD.POOLER_TYPE / POOLER_SAMPLING_RATIO) on the ResNet's
  deepest stage (res5, else res4), averaged over the 7x7; comparable across every start (MoCo v2
  and DetCo transfer only the ResNet).
* ``box_head``: the detector's box pooler over ROI_HEADS.IN_FEATURES and its box head, "fc7"
  (ROI_BOX_HEAD.FC_DIM wide); only meaningful for starts that transfer the box head (2DRCL) or
  fine-tuned detectors, random otherwise.

Features are L2-normalised; each test RoI takes the k train RoIs of highest cosine similarity, which
vote with weights exp(similarity / T) (weighted kNN of InstDisc / DINO, T = 0.07; --temperature 0: a
plain majority); the largest vote wins (ties: the lowest class index). Per feature: top-1 accuracy
(``acc``) and per LVIS frequency group of the category (``acc_r/c/f``: its ``frequency`` in the
dataset's json), mean per-class accuracy over the test classes (``mean_class_acc``,
``mean_class_acc_r/c/f``: a rare class counts as much as a frequent one), "layer", "dim",
"num_train", "num_test", "num_test_r/c/f", "num_test_classes" and "num_test_unseen" (test RoIs whose
class has no train RoI: never right); null for a group without test RoIs. Deterministic: fixed image
order, seeded init, no sampling.

A table is printed and a json written atomically: {"backbone": {...}, "box_head": {...}, "weights",
"config", "train_dataset", "test_dataset", "num_train_images", "num_test_images", "k", "temperature",
"seconds"}. A missing weights file or a dataset that is not registered or has no box annotations:
a ValueError naming it (:func:`run_probe`), exit status 2 on the command line. Runs on CPU when CUDA
is absent.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.checkpoint import atomic_write_text
from ..utils import seeded_rng
from .gt_box_features import box_head_features, images_with_boxes, test_time_mapper_with_boxes

logger = logging.getLogger("drcl_d2.probe")

__all__ = ["FEATURES", "RoIFeatures", "run_probe", "extract_roi_features", "knn_predict", "probe_metrics",
           "category_groups", "main"]

FEATURES = ("backbone", "box_head")
GROUPS = ("r", "c", "f")
BACKBONE_POOL_SIZE = 7  # RoIAlign output side for the "backbone" feature (then averaged)
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07  # InstDisc / DINO weighted kNN
DEFAULT_BATCH_SIZE = 8
SIMILARITY_CHUNK = 1024  # test RoIs per similarity matrix block (bounds memory on large sets)


@dataclass
class RoIFeatures:
    """Features of the ground-truth boxes of some images, one row per box, in dataset order."""

    features: dict  # name in FEATURES -> (R, D_name) float32 tensor on the CPU, not normalised
    labels: torch.Tensor  # (R,) int64 contiguous category ids
    image_index: torch.Tensor  # (R,) int64 index of the box's image in the list that was extracted
    layers: dict  # name -> the layer it was taken from ("res5", "fc7")

    def subset(self, num_images: int) -> "RoIFeatures":
        """The boxes of the first num_images images."""
        keep = self.image_index < num_images
        return RoIFeatures({n: f[keep] for n, f in self.features.items()}, self.labels[keep],
                           self.image_index[keep], self.layers)


# ---- datasets, model and features ----------------------------------------------------------------
def _load_dataset(name: str, max_images: int | None) -> list[dict]:
    """The first max_images images (all when None) of a registered dataset that have a gt box."""
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered (add [name, json_file, image_root] to "
                         "DATASETS.LVIS_CUSTOM, or use a detectron2 builtin name)")
    dicts = DatasetCatalog.get(name)
    with_boxes = images_with_boxes(dicts)
    if not with_boxes:
        raise ValueError(f"dataset {name!r} has no annotations (no non-crowd ground-truth box in its "
                         f"{len(dicts)} images; an unlabeled image folder?): the probe needs labeled boxes")
    return with_boxes[:max_images]


def category_groups(dataset_names: Sequence[str]) -> list | None:
    """LVIS frequency ("r" / "c" / "f") per contiguous category id, from the first dataset that has
    it: its metadata's ``category_frequencies`` (drcl_d2's datasets), else the ``frequency`` of the
    categories in its ``json_file`` (detectron2's builtin LVIS). None when none has them (COCO)."""
    from detectron2.data import MetadataCatalog

    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        freqs = getattr(meta, "category_frequencies", None)
        if freqs is not None and all(f in GROUPS for f in freqs):
            return list(freqs)
        json_file = getattr(meta, "json_file", None)
        if json_file and os.path.isfile(json_file):
            with open(json_file) as f:
                freqs = [c.get("frequency") for c in sorted(json.load(f).get("categories", []), key=lambda c: c["id"])]
            if freqs and all(f in GROUPS for f in freqs):
                return freqs
    return None


def _check_weights(weights: str) -> None:
    """A local weights path must exist (URLs and detectron2:// names are left to PathManager)."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ValueError(f"weights file not found: {weights}")


def _build_model(cfg, weights: str, seed: int):
    """The detector of cfg in eval mode, with weights loaded ("" = random init, seeded)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    with seeded_rng(seed):  # the random-init baseline (and any head the weights lack) is reproducible
        model = build_model(cfg)
    if not hasattr(model, "backbone") or not hasattr(model, "preprocess_image"):
        raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} has no backbone / "
                         "preprocess_image: the probe needs an R-CNN style detector config")
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.info(f"no weights: probing a random-init model (seed {seed})")
    return model.eval()


@torch.no_grad()
def extract_roi_features(cfg, model, dataset_dicts: list[dict], batch_size: int = DEFAULT_BATCH_SIZE,
                         desc: str = "probe") -> RoIFeatures:
    """"backbone" and "box_head" features of every non-crowd gt box of dataset_dicts (model in eval)."""
    from detectron2.modeling.poolers import ROIPooler
    from tqdm import tqdm

    mapper = test_time_mapper_with_boxes(cfg)
    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)  # the ResNet (FPN: its bottom-up)
    stages = bottom_up.output_shape()
    stage = next((s for s in ("res5", "res4") if s in stages), None)
    if stage is None:
        raise ValueError(f"the backbone outputs {sorted(stages)}: the probe needs res4 or res5")
    stage_pooler = ROIPooler(output_size=BACKBONE_POOL_SIZE, scales=(1.0 / stages[stage].stride,),
                             sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                             pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE)
    device = next(model.parameters()).device
    resnet_outputs = {}  # the ResNet's stage maps of the current batch, caught on their way into the FPN
    hook = bottom_up.register_forward_hook(lambda module, args, output: resnet_outputs.update(output))
    chunks, all_labels, image_index = {"backbone": []}, [], []
    try:
        for start in tqdm(range(0, len(dataset_dicts), batch_size), desc=desc, unit="batch", file=sys.stderr):
            inputs = [mapper(d) for d in dataset_dicts[start:start + batch_size]]  # "instances": gt in input px
            boxes = [x["instances"].gt_boxes.to(device) for x in inputs]
            images = model.preprocess_image(inputs)  # ImageList (B, 3, H, W), normalised and padded
            resnet_outputs.clear()
            features = model.backbone(images.tensor)  # FPN: {"p2".."p6"}; C4: {"res4"}
            pooled = stage_pooler([resnet_outputs[stage]], boxes)  # (R, C, 7, 7)
            chunks["backbone"].append(pooled.mean(dim=(2, 3)).float().cpu())  # (R, C)
            fc7 = box_head_features(getattr(model, "roi_heads", None), features, boxes)  # (R, FC_DIM) or None
            if fc7 is not None:
                chunks.setdefault("box_head", []).append(fc7.float().cpu())
            all_labels += [x["instances"].gt_classes for x in inputs]
            image_index += [torch.full((len(x["instances"]),), start + i, dtype=torch.int64)
                            for i, x in enumerate(inputs)]
    finally:
        hook.remove()
    layers = {"backbone": stage}
    if "box_head" in chunks:
        layers["box_head"] = "fc7"
    else:
        logger.warning(f"{type(model.roi_heads).__name__} has no box_pooler/box_head: only 'backbone' is probed")
    return RoIFeatures({name: torch.cat(c) for name, c in chunks.items()}, torch.cat(all_labels),
                       torch.cat(image_index), layers)


# ---- kNN and metrics -----------------------------------------------------------------------------
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int, num_classes: int, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Weighted kNN on cosine similarity: (M,) predicted classes of the (M, D) test features.

    train_features (N, D) and test_features (M, D) are L2-normalised here. Each test row votes
    with its k most similar train rows, weight exp(sim / temperature) (temperature 0: weight 1).
    """
    if len(train_features) == 0:
        raise ValueError("the probe has no train RoIs")
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    test = F.normalize(test_features.float(), dim=1)  # (M, D)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test), SIMILARITY_CHUNK):
        similarity = test[start:start + SIMILARITY_CHUNK] @ train.T  # (m, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (m, k)
        weights = (top_similarity / temperature).exp() if temperature > 0 else torch.ones_like(top_similarity)
        votes = torch.zeros(len(similarity), num_classes, dtype=weights.dtype)  # (m, C)
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))  # ties: the first maximum
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def probe_metrics(predictions: torch.Tensor, labels: torch.Tensor, groups: list | None,
                  train_labels: torch.Tensor | None = None) -> dict:
    """Top-1 accuracy and mean per-class accuracy, overall and per frequency group (None when empty)."""
    correct = (predictions == labels).numpy()  # (M,) bool
    labels_np = labels.numpy()
    class_accuracy = {int(c): float(correct[labels_np == c].mean()) for c in np.unique(labels_np)}
    acc, mean_class_acc, num_test = {}, {}, {}
    for g in GROUPS:
        if groups is None:
            acc[g] = mean_class_acc[g] = num_test[g] = None
            continue
        in_group = np.array([groups[c] == g for c in labels_np], dtype=bool)  # (M,)
        acc[g] = float(correct[in_group].mean()) if in_group.any() else None
        mean_class_acc[g] = _mean(a for c, a in class_accuracy.items() if groups[c] == g)
        num_test[g] = int(in_group.sum())
    out = {
        "acc": float(correct.mean()) if len(correct) else None,
        **{f"acc_{g}": acc[g] for g in GROUPS},
        "mean_class_acc": _mean(class_accuracy.values()),
        **{f"mean_class_acc_{g}": mean_class_acc[g] for g in GROUPS},
        "num_test": int(len(labels_np)),
        **{f"num_test_{g}": num_test[g] for g in GROUPS},
        "num_test_classes": len(class_accuracy),
    }
    if train_labels is not None:
        seen = set(train_labels.tolist())
        out["num_test_unseen"] = int(sum(int(c) not in seen for c in labels_np))
    return out


# ---- the probe -----------------------------------------------------------------------------------
def _num_classes(cfg, dataset_names: Sequence[str]) -> int:
    from detectron2.data import MetadataCatalog

    counts = {n: len(MetadataCatalog.get(n).thing_classes) for n in dataset_names
              if getattr(MetadataCatalog.get(n), "thing_classes", None)}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the train and test datasets have different category sets: {counts}")
    return next(iter(counts.values())) if counts else int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def run_probe(cfg, weights: str, train_dataset: str | None = None, test_dataset: str | None = None,
              max_train_images: int | None = None, max_test_images: int | None = None,
              k: int = DEFAULT_K, *, temperature: float = DEFAULT_TEMPERATURE,
              batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> dict:
    """kNN-probe the "backbone" and "box_head" RoI features of cfg's detector (drcl_d2's keys; its
    DATASETS.LVIS_CUSTOM is registered) loaded with weights ("" = random init, seeded with seed), as
    the module's doc describes; train_dataset / test_dataset default to DATASETS.TRAIN[0] / TEST[0],
    max_train_images / max_test_images to all. ValueError: weights file missing, dataset not
    registered or without boxes, bad k."""
    from drcl_d2.data.datasets import register_datasets_from_config

    _check_weights(weights)  # before any image is read
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for what, n in (("max_train_images", max_train_images), ("max_test_images", max_test_images)):
        if n is not None and n < 1:
            raise ValueError(f"{what} must be >= 1 (or None for all), got {n}")
    register_datasets_from_config(cfg)  # no-op for names already registered with the same files
    if train_dataset is None:
        if not cfg.DATASETS.TRAIN:
            raise ValueError("no --train-dataset and DATASETS.TRAIN is empty")
        train_dataset = cfg.DATASETS.TRAIN[0]
    if test_dataset is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("no --test-dataset and DATASETS.TEST is empty")
        test_dataset = cfg.DATASETS.TEST[0]
    train_dicts = _load_dataset(train_dataset, max_train_images)
    test_dicts = _load_dataset(test_dataset, max_test_images)
    num_classes = _num_classes(cfg, (train_dataset, test_dataset))
    groups = category_groups((train_dataset, test_dataset))
    if groups is None:
        logger.warning(f"no LVIS 'frequency' for the categories of {train_dataset!r} / {test_dataset!r}: "
                       "per-group numbers are null")
    model = _build_model(cfg, weights, seed)

    start_time = time.perf_counter()
    if train_dataset == test_dataset:  # one pass over the union: both are prefixes of the same list
        longer = train_dicts if len(train_dicts) >= len(test_dicts) else test_dicts
        both = extract_roi_features(cfg, model, longer, batch_size, desc=f"probe {train_dataset}")
        train, test = both.subset(len(train_dicts)), both.subset(len(test_dicts))
    else:
        train = extract_roi_features(cfg, model, train_dicts, batch_size, desc=f"probe {train_dataset}")
        test = extract_roi_features(cfg, model, test_dicts, batch_size, desc=f"probe {test_dataset}")

    result = {}
    for name in FEATURES:
        if name not in train.features:
            continue
        predictions = knn_predict(train.features[name], train.labels, test.features[name], k,
                                  max(num_classes, int(train.labels.max()) + 1), temperature)
        metrics = probe_metrics(predictions, test.labels, groups, train.labels)
        result[name] = {"layer": train.layers[name], "dim": int(train.features[name].shape[1]),
                        "num_train": int(len(train.labels)), **metrics}
    unseen = next(iter(result.values()))["num_test_unseen"]
    if unseen:
        logger.info(f"{unseen} of {len(test.labels)} test RoIs have a class without train RoIs: they "
                    "cannot be classified right (more --max-train-images gives them a chance)")
    result.update(weights=weights, train_dataset=train_dataset, test_dataset=test_dataset,
                  num_train_images=len(train_dicts), num_test_images=len(test_dicts), k=int(k),
                  temperature=float(temperature), seconds=time.perf_counter() - start_time)
    return result


# ---- command line --------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The probe's numbers as a text table (accuracies in %)."""
    from tabulate import tabulate

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    metrics = [f"{m}{g}" for m in ("acc", "mean_class_acc") for g in ("", "_r", "_c", "_f")]
    rows = []
    for name in (n for n in FEATURES if n in result):
        r = result[name]
        rows.append([name, r["layer"], r["dim"], *(pct(r[m]) for m in metrics), r["num_train"], r["num_test"]])
    headers = ["feature", "layer", "dim", "acc", "acc_r", "acc_c", "acc_f",
               "mAcc", "mAcc_r", "mAcc_c", "mAcc_f", "train RoIs", "test RoIs"]
    return tabulate(rows, headers=headers, tablefmt="pipe")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="detectron2 detector config (yaml)")
    parser.add_argument("--weights", required=True, help='detectron2 weights (.pkl / .pth); "" = random init')
    parser.add_argument("--train-dataset", default=None, help="registered dataset (default DATASETS.TRAIN[0])")
    parser.add_argument("--test-dataset", default=None, help="registered dataset (default DATASETS.TEST[0])")
    parser.add_argument("--max-train-images", type=int, default=None, help="first N train images (default all)")
    parser.add_argument("--max-test-images", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours (default {DEFAULT_K})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"vote weight exp(sim / T) (default {DEFAULT_TEMPERATURE}); 0 = majority vote")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (weights \"\")")
    parser.add_argument("--output", default="probe.json", help="json to write (default probe.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    for flag in ("k", "batch_size", "max_train_images", "max_test_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def main(argv=None) -> dict:
    """Run the command; returns the json's content. Bad input: message on stderr, exit status 2."""
    from detectron2.utils.logger import setup_logger

    from drcl_d2.utils import load_config

    args = parse_args(argv)
    setup_logger(name="drcl_d2")
    try:
        _check_weights(args.weights)
        cfg = load_config(args.config_file, args.opts, register_datasets=True)
        result = run_probe(cfg, args.weights, args.train_dataset, args.test_dataset, args.max_train_images,
                           args.max_test_images, args.k, temperature=args.temperature,
                           batch_size=args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    result["config"] = args.config_file
    atomic_write_text(json.dumps(result, indent=2), args.output)  # readers never see a half-written file
    print(f"kNN probe (k={args.k}, T={args.temperature}) of {args.weights or 'random init'}: "
          f"{result['train_dataset']} ({result['num_train_images']} images) -> "
          f"{result['test_dataset']} ({result['num_test_images']} images), {result['seconds']:.1f} s")
    print(format_table(result))
    print(f"-> {args.output}")
    return result


if __name__ == "__main__":
    main()
