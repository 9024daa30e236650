"""kNN probe of a detector's RoI features on ground-truth boxes: how well do they separate categories?

    python -m drcl_d2.tools.probe --config-file CFG --weights W [--train-dataset NAME] [--test-dataset NAME] \
        [--max-train-images N] [--max-test-images N] [--k 20] [--temperature 0.07] [--batch-size 8] \
        [--seed 0] [--output probe.json] [KEY VALUE ...]

The detector is built from CFG (trailing KEY VALUE pairs override it, as in detectron2's tools;
datasets of DATASETS.LVIS_CUSTOM are registered) and W is loaded into it: a converted ``.pkl``
(drcl-convert), a ``model_final.pth``, or ``""`` for a random-init model (the scratch baseline,
seeded with --seed). MODEL.WEIGHTS of the config is not used. The datasets default to
DATASETS.TRAIN[0] and DATASETS.TEST[0]; each takes its first N images that have a ground-truth box.

Every image goes through the test-time pipeline (detectron2's ``DatasetMapper(cfg, is_train=False)``
augmentations: ResizeShortestEdge to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), the model in eval mode,
without gradients, batches of --batch-size images. For every ground-truth box (crowd boxes are
left out), rescaled to the input size, two features are taken:

* ``backbone``: RoIAlign (detectron2's ROIPooler, 7x7, ROI_BOX_HEAD.POOLER_TYPE and
  POOLER_SAMPLING_RATIO) on the deepest stage of the ResNet (``backbone.bottom_up``: res5 when it
  outputs it, else res4), average-pooled over the 7x7. Comparable across every start: MoCo v2 and
  DetCo transfer only the ResNet.
* ``box_head``: the detector's own box pooler over ROI_HEADS.IN_FEATURES (the FPN levels) and its
  box head, "fc7" (ROI_BOX_HEAD.FC_DIM wide). Only meaningful for starts that transfer the box head
  (2DRCL) or fine-tuned detectors; random otherwise.

Probe: features are L2-normalised; each test RoI takes the k train RoIs of highest cosine
similarity and votes with weights exp(similarity / T) (weighted kNN of InstDisc / DINO, T = 0.07;
--temperature 0 gives a plain majority vote); the class with the largest vote wins (ties: the
lowest class index). Reported per feature: top-1 accuracy over all test RoIs (``acc``) and per
LVIS frequency group of the RoI's category (``acc_r`` / ``acc_c`` / ``acc_f``: the category's
``frequency`` in the dataset's json), and mean per-class accuracy (``mean_class_acc`` and
``mean_class_acc_r/c/f``: accuracy averaged over the classes present in the test RoIs, so that a
rare class counts as much as a frequent one). A group without test RoIs gets ``null``. Everything
is deterministic: fixed image order, seeded init, no sampling.

A table is printed and a json written (atomically)::

    {"backbone": {"layer": "res5", "dim": 512, "acc": .., "acc_r": .., "acc_c": .., "acc_f": ..,
                  "mean_class_acc": .., "mean_class_acc_r": .., "mean_class_acc_c": ..,
                  "mean_class_acc_f": .., "num_train": .., "num_test": .., "num_test_r": ..,
                  "num_test_c": .., "num_test_f": .., "num_test_classes": ..,
                  "num_test_unseen": ..},
     "box_head": {...same keys, "layer": "fc7"...},
     "weights": W, "config": CFG, "train_dataset": .., "test_dataset": .., "num_train_images": ..,
     "num_test_images": .., "k": .., "temperature": .., "seconds": ..}

``num_test_unseen`` counts test RoIs whose class has no train RoI (they can never be right).
The Python entry point is :func:`run_probe`. A missing weights file, a dataset name that is not
registered, or a dataset without box annotations raises ValueError naming it; the command line
prints the message and exits with status 2. Runs on CPU when CUDA is absent.
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

logger = logging.getLogger("drcl_d2.probe")

__all__ = [
    "FEATURES",
    "RoIFeatures",
    "run_probe",
    "extract_roi_features",
    "knn_predict",
    "probe_metrics",
    "category_groups",
    "main",
]

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


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def _is_crowd(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0))


def _load_dataset(name: str, max_images: int | None) -> list[dict]:
    """The first max_images images (all when None) of a registered dataset that have a gt box."""
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered (add [name, json_file, image_root] to "
                         "DATASETS.LVIS_CUSTOM, or use a detectron2 builtin name)")
    dicts = DatasetCatalog.get(name)
    with_boxes = [d for d in dicts if any(not _is_crowd(a) for a in d.get("annotations", ()))]
    if not with_boxes:
        raise ValueError(f"dataset {name!r} has no annotations (no non-crowd ground-truth box in its "
                         f"{len(dicts)} images; an unlabeled image folder?): the probe needs labeled boxes")
    return with_boxes if max_images is None else with_boxes[:max_images]


def category_groups(dataset_names: Sequence[str]) -> list | None:
    """LVIS frequency ("r" / "c" / "f") per contiguous category id, from the first dataset that has it.

    Read from the metadata drcl_d2 registers (``category_frequencies``), else from the
    ``frequency`` field of the categories in the metadata's ``json_file`` (detectron2's builtin
    LVIS splits). None when no dataset has them (e.g. COCO): the per-group numbers are then null.
    """
    from detectron2.data import MetadataCatalog

    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        freqs = getattr(meta, "category_frequencies", None)
        if freqs is not None and all(f in GROUPS for f in freqs):
            return list(freqs)
        json_file = getattr(meta, "json_file", None)
        if json_file and os.path.isfile(json_file):
            with open(json_file) as f:
                categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
            freqs = [c.get("frequency") for c in categories]
            if freqs and all(f in GROUPS for f in freqs):
                return freqs
    return None


# ---------------------------------------------------------------------------------------------
# model and features
# ---------------------------------------------------------------------------------------------
def _check_weights(weights: str) -> None:
    """A local weights path must exist (URLs and detectron2:// names are left to PathManager)."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ValueError(f"weights file not found: {weights}")


def _build_model(cfg, weights: str, seed: int):
    """The detector of cfg in eval mode, with weights loaded ("" = random init, seeded)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import drcl_d2.modeling  # noqa: F401  (registers drcl_d2's meta-architectures)

    _check_weights(weights)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)  # the random-init baseline (and any head the weights lack) is reproducible
        model = build_model(cfg)
    if not hasattr(model, "backbone") or not hasattr(model, "preprocess_image"):
        raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} has no backbone / "
                         "preprocess_image: the probe needs an R-CNN style detector config")
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.info(f"no weights: probing a random-init model (seed {seed})")
    return model.eval()


def _bottom_up(model):
    """The ResNet of the detector: backbone.bottom_up of FPN models, the backbone itself otherwise."""
    return getattr(model.backbone, "bottom_up", model.backbone)


def _deepest_stage(bottom_up) -> str:
    stages = bottom_up.output_shape()
    for name in ("res5", "res4"):
        if name in stages:
            return name
    raise ValueError(f"the backbone outputs {sorted(stages)}: the probe needs res4 or res5")


def _box_head_parts(model):
    """(box pooler, box head, in_features) of StandardROIHeads-like heads, or None."""
    roi_heads = getattr(model, "roi_heads", None)
    box_head = getattr(roi_heads, "box_head", None)
    if box_head is None or not hasattr(roi_heads, "box_pooler"):
        return None
    if isinstance(box_head, torch.nn.ModuleList):  # CascadeROIHeads: its first stage
        box_head = box_head[0]
    return roi_heads.box_pooler, box_head, list(roi_heads.box_in_features)


def _read_batch(mapper, dataset_dicts: list[dict], device) -> tuple[list[dict], list, list[torch.Tensor]]:
    """Images through the test-time augmentations; gt boxes in input pixels; their labels."""
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.structures import Boxes, BoxMode

    inputs, boxes, labels = [], [], []
    for d in dataset_dicts:
        image = utils.read_image(d["file_name"], format=mapper.image_format)  # (H, W, 3) uint8
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = mapper.augmentations(aug_input)  # ResizeShortestEdge(MIN/MAX_SIZE_TEST)
        image = aug_input.image  # (h, w, 3)
        anns = [a for a in d["annotations"] if not _is_crowd(a)]
        xyxy = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                        dtype=np.float64).reshape(-1, 4)
        gt = Boxes(torch.as_tensor(transforms.apply_box(xyxy), dtype=torch.float32))  # (n, 4) input px
        gt.clip(image.shape[:2])
        inputs.append({"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))})  # (3, h, w)
        boxes.append(gt.to(device))
        labels.append(torch.tensor([a["category_id"] for a in anns], dtype=torch.int64))
    return inputs, boxes, labels


@torch.no_grad()
def extract_roi_features(cfg, model, dataset_dicts: list[dict], batch_size: int = DEFAULT_BATCH_SIZE,
                         desc: str = "probe") -> RoIFeatures:
    """"backbone" and "box_head" features of every non-crowd gt box of dataset_dicts (model in eval)."""
    from detectron2.data import DatasetMapper
    from detectron2.modeling.poolers import ROIPooler
    from tqdm import tqdm

    mapper = DatasetMapper(cfg, is_train=False)  # only its image format and test augmentations are used
    bottom_up = _bottom_up(model)
    stage = _deepest_stage(bottom_up)
    stage_pooler = ROIPooler(
        output_size=BACKBONE_POOL_SIZE,
        scales=(1.0 / bottom_up.output_shape()[stage].stride,),
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
    )
    box_parts = _box_head_parts(model)
    layers = {"backbone": stage}
    if box_parts is None:
        logger.warning(f"{type(model.roi_heads).__name__} has no box_pooler/box_head: only 'backbone' is probed")
    else:
        layers["box_head"] = "fc7"
    device = next(model.parameters()).device

    resnet_outputs = {}  # the ResNet's stage maps of the current batch, caught on their way into the FPN
    hook = bottom_up.register_forward_hook(lambda module, args, output: resnet_outputs.update(output))
    chunks = {name: [] for name in layers}
    all_labels, image_index = [], []
    try:
        for start in tqdm(range(0, len(dataset_dicts), batch_size), desc=desc, unit="batch", file=sys.stderr):
            batch = dataset_dicts[start:start + batch_size]
            inputs, boxes, labels = _read_batch(mapper, batch, device)
            images = model.preprocess_image(inputs)  # ImageList (B, 3, H, W), normalised and padded
            resnet_outputs.clear()
            features = model.backbone(images.tensor)  # FPN: {"p2".."p6"}; C4: {"res4"}
            pooled = stage_pooler([resnet_outputs[stage]], boxes)  # (R, C, 7, 7)
            chunks["backbone"].append(pooled.mean(dim=(2, 3)).float().cpu())  # (R, C)
            if box_parts is not None:
                box_pooler, box_head, in_features = box_parts
                x = box_pooler([features[f] for f in in_features], boxes)  # (R, C_fpn, 7, 7)
                chunks["box_head"].append(box_head(x).flatten(1).float().cpu())  # (R, FC_DIM)
            all_labels += labels
            image_index += [torch.full((len(lab),), start + i, dtype=torch.int64) for i, lab in enumerate(labels)]
    finally:
        hook.remove()
    return RoIFeatures({name: torch.cat(c) for name, c in chunks.items()}, torch.cat(all_labels),
                       torch.cat(image_index), layers)


# ---------------------------------------------------------------------------------------------
# kNN and metrics
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------------
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
    """kNN-probe the "backbone" and "box_head" RoI features of cfg's detector loaded with weights.

    Args:
        cfg: a detectron2 config with drcl_d2's keys (e.g. from drcl_d2.utils.load_config); the
            datasets of its DATASETS.LVIS_CUSTOM are registered here if they are not yet.
        weights: detectron2 weights (.pkl / .pth), or "" for a random-init model.
        train_dataset / test_dataset: registered names; None = DATASETS.TRAIN[0] / TEST[0].
        max_train_images / max_test_images: first N images with a gt box; None = all.
        k: neighbours; temperature: vote weight exp(sim / T), 0 = majority vote.
        batch_size: images per forward pass; seed: torch seed of the model's random init.

    Returns:
        {feature: {"layer", "dim", "acc", "acc_r", "acc_c", "acc_f", "mean_class_acc",
        "mean_class_acc_r/c/f", "num_train", "num_test", "num_test_r/c/f", "num_test_classes",
        "num_test_unseen"}, "weights", "train_dataset", "test_dataset", "num_train_images",
        "num_test_images", "k", "temperature", "seconds"}.

    Raises:
        ValueError: weights file missing, dataset not registered or without boxes, bad k.
    """
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
    result.update({
        "weights": weights,
        "train_dataset": train_dataset,
        "test_dataset": test_dataset,
        "num_train_images": len(train_dicts),
        "num_test_images": len(test_dicts),
        "k": int(k),
        "temperature": float(temperature),
        "seconds": time.perf_counter() - start_time,
    })
    return result


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The probe's numbers as a text table (accuracies in %)."""
    from tabulate import tabulate

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    rows = []
    for name in FEATURES:
        if name in result:
            r = result[name]
            rows.append([name, r["layer"], r["dim"], pct(r["acc"]), pct(r["acc_r"]), pct(r["acc_c"]),
                         pct(r["acc_f"]), pct(r["mean_class_acc"]), pct(r["mean_class_acc_r"]),
                         pct(r["mean_class_acc_c"]), pct(r["mean_class_acc_f"]), r["num_train"], r["num_test"]])
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
