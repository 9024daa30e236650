"""Transfer-scale report: how far converted weights move the detector's activation scales.

SPEC §7: nothing in 2DRCL pretraining pins the scale of the transferred FPN and box head (the
contrastive heads end in BatchNorm'd projectors, the RPN head can absorb any scale), and SR can
teach the FPN a large per-channel offset. A fine-tuning run then starts from FPN maps, box
features and classifier logits at scales the freshly initialised parts of the detector (RPN
objectness, the class-specific box predictor) were not initialised for.

:func:`measure_transfer_scale` runs the detector of a config as initialised ("fresh") and with the
converted weights ("converted") on the same few test-time-resized images and compares the backbone
maps (FPN p2..p6, C4 res4: std, and std over channels of the per-channel means), the box features
at the ground-truth boxes (FPN "fc7", C4 pooled res5: mean L2 norm per box), the fresh classifier's
logits on them (std, max |logit|) and the RPN objectness logits (std). :func:`check_transfer_scale`
turns the result into warnings, :func:`format_scale_table` into the table ``drcl-convert
--target-config`` prints.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tabulate import tabulate

from ..tools.gt_box_features import box_head_features, first_stage, images_with_boxes, test_time_mapper_with_boxes
from ..utils import atomic_write_json, seeded_rng, unpadded_size

__all__ = ["DatasetUnavailableError", "FC7_NORM_RATIO_MAX", "FPN_STD_RATIO_RANGE", "MAX_ABS_CLS_LOGIT",
           "TransferScaleError", "check_transfer_scale", "format_scale_table", "measure_transfer_scale",
           "report_transfer_scale"]

# Goal ranges of check_transfer_scale.
FPN_STD_RATIO_RANGE = (0.8, 1.2)  # converted / fresh std of each FPN level
FC7_NORM_RATIO_MAX = 4.0  # converted / fresh mean L2 norm of the box features
MAX_ABS_CLS_LOGIT = 2.0  # converted max |logit| of the fresh classifier must stay below this

NORMALIZATION_NOTE = (
    "models in training mode without losses: BatchNorm uses the batch statistics of these "
    "images, as in the first fine-tuning iterations (FrozenBN and GroupNorm are unaffected)"
)


class TransferScaleError(Exception):
    """The transfer scale cannot be measured for this config / checkpoint."""


class DatasetUnavailableError(TransferScaleError):
    """The dataset to measure on is not registered, cannot be read, or has no boxes."""

    def __init__(self, dataset_name: str, message: str):
        super().__init__(f"dataset {dataset_name!r}: {message}")
        self.dataset_name = dataset_name


# ---- Inputs --------------------------------------------------------------------------------------
def _dataset_name(cfg, dataset_name: Optional[str]) -> str:
    names = ([dataset_name] if dataset_name else []) + list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        raise TransferScaleError("the config names no dataset (DATASETS.TEST and DATASETS.TRAIN are empty): give one")
    return names[0]


def _mapped_inputs(cfg, name: str, num_images: int, seed: int) -> List[dict]:
    """``num_images`` test-time mapped images of dataset ``name`` that keep a ground-truth box, drawn in
    a seeded random order; an LVIS_CUSTOM entry of the config is registered first."""
    from detectron2.data import DatasetCatalog

    from drcl_d2.data.datasets import register_lvis_format

    for entry in cfg.DATASETS.LVIS_CUSTOM:
        if len(entry) == 3 and entry[0] == name and name not in DatasetCatalog.list():
            register_lvis_format(name, entry[1], entry[2], cfg.DATASETS.LVIS_CUSTOM_PATH_RULE)
    if name not in DatasetCatalog.list():
        raise DatasetUnavailableError(name, "not registered (neither a detectron2 builtin nor in DATASETS.LVIS_CUSTOM)")
    try:
        dicts = list(DatasetCatalog.get(name))
    except Exception as e:  # noqa: BLE001 - any failure to read the dataset means "unavailable"
        raise DatasetUnavailableError(name, f"could not be loaded: {type(e).__name__}: {e}") from e
    with_boxes = images_with_boxes(dicts)
    if not with_boxes:
        raise DatasetUnavailableError(name, f"none of its {len(dicts)} images has a ground-truth box annotation")
    order = list(range(len(with_boxes)))
    random.Random(seed).shuffle(order)
    mapper = test_time_mapper_with_boxes(cfg)
    inputs = []
    for i in order:
        try:
            mapped = mapper(with_boxes[i])
        except Exception as e:  # noqa: BLE001
            raise DatasetUnavailableError(name, f"image {with_boxes[i].get('file_name')} could not be read: "
                                                f"{type(e).__name__}: {e}") from e
        if len(mapped["instances"]):  # boxes can vanish when degenerate after the resize
            inputs.append(mapped)
        if len(inputs) == num_images:
            break
    if not inputs:
        raise DatasetUnavailableError(name, "no image keeps a valid box after the test-time resize")
    return inputs


# ---- Models --------------------------------------------------------------------------------------
def _build_pair(cfg, weights_path: str, seed: int) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(fresh, converted): one initialisation from ``seed``; the copy gets ``weights_path`` loaded."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from drcl_d2.engine.checkpoint import quiet_checkpoint_logs

    try:
        with seeded_rng(seed):
            fresh = build_model(cfg)
    except Exception as e:  # noqa: BLE001
        raise TransferScaleError(f"could not build the model: {type(e).__name__}: {e}") from e
    if not all(hasattr(fresh, a) for a in ("backbone", "roi_heads", "preprocess_image")):
        raise TransferScaleError(f"{type(fresh).__name__} ({cfg.MODEL.META_ARCHITECTURE}) is not an R-CNN with a "
                                 "backbone, RoI heads and preprocess_image: only Faster / Mask R-CNN are measured")
    converted = copy.deepcopy(fresh)  # the same values as a second build from the same seed
    with quiet_checkpoint_logs():  # the conversion report already lists what loads where
        DetectionCheckpointer(converted, save_to_disk=False).load(weights_path)
    return fresh, converted


def _valid_values(maps: torch.Tensor, image_sizes: Sequence[Tuple[int, int]], stride: int) -> torch.Tensor:
    """(N, C, H, W) maps of padded images -> (C, M) float64 values of the cells inside the images
    (:func:`drcl_d2.utils.unpadded_size` of each)."""
    cells = [unpadded_size(h, w, stride) for h, w in image_sizes]  # (rows, cols) per image
    return torch.cat([maps[i, :, :r, :c].reshape(maps.shape[1], -1) for i, (r, c) in enumerate(cells)], dim=1).double()


def _map_stats(values: torch.Tensor) -> Dict[str, float]:
    """values: (C, M) -> std of all values and the std over channels of the per-channel means."""
    return {"std": float(values.std()),
            "channel_mean_spread": float(values.mean(dim=1).std()) if values.shape[0] > 1 else 0.0}


def _box_features(model, features: Dict[str, torch.Tensor], boxes: list) -> torch.Tensor:
    """The RoI box features the box predictor sees, on ``boxes`` -> (R, D)."""
    heads = model.roi_heads
    fc7 = box_head_features(heads, features, boxes)  # StandardROIHeads (FPN): (R, FC_DIM)
    if fc7 is not None:
        return fc7
    if hasattr(heads, "_shared_roi_transform"):  # Res5ROIHeads (C4)
        res5 = heads._shared_roi_transform([features[f] for f in heads.in_features], boxes)  # (R, 2048, S, S)
        return res5.mean(dim=[2, 3])  # (R, 2048), as Res5ROIHeads feeds its predictor
    raise TransferScaleError(f"unsupported RoI heads {type(heads).__name__}: no box pooler / box head")


@torch.no_grad()
def _measure_model(model, predictor, inputs: List[dict]) -> Dict[str, Any]:
    """Scales of one model on ``inputs``, in training mode (batch statistics in BatchNorm), without
    losses: only the backbone, the RPN head, the RoI pooler / box head and ``predictor`` run."""
    model.train()
    predictor.train()
    images = model.preprocess_image(inputs)  # ImageList: tensor (N, 3, H_pad, W_pad)
    features = model.backbone(images.tensor)  # {name: (N, C, H_pad / s, W_pad / s)}
    shapes = model.backbone.output_shape()
    out: Dict[str, Any] = {"features": {name: _map_stats(_valid_values(x, images.image_sizes, shapes[name].stride))
                                        for name, x in features.items()}}
    boxes = [d["instances"].gt_boxes for d in inputs]  # per image: Boxes (n_i, 4) XYXY input px
    box_feats = _box_features(model, features, boxes)  # (R, D)
    out["fc7_norm"] = float(box_feats.double().norm(dim=1).mean())
    scores = first_stage(predictor)(box_feats)[0].double()  # (R, K + 1) logits
    out["cls_logit_std"] = float(scores.std())
    out["cls_logit_max_abs"] = float(scores.abs().max())

    rpn = getattr(model, "proposal_generator", None)
    out["rpn_objectness_std"] = None
    if rpn is not None and hasattr(rpn, "rpn_head"):
        logits, _ = rpn.rpn_head([features[f] for f in rpn.in_features])  # per level (N, A, Hi, Wi)
        values = torch.cat([_valid_values(x, images.image_sizes, shapes[f].stride).flatten()
                            for f, x in zip(rpn.in_features, logits)])
        out["rpn_objectness_std"] = float(values.std())
    return out


def _ratios(converted: Any, fresh: Any) -> Any:
    """converted / fresh through nested dicts; None where either is None or fresh is 0."""
    if isinstance(converted, Mapping):
        return {k: _ratios(converted[k], fresh[k]) for k in converted}
    return None if converted is None or fresh is None or fresh == 0 else converted / fresh


# ---- API -----------------------------------------------------------------------------------------
def measure_transfer_scale(cfg, weights_path: str, *, dataset_name: Optional[str] = None, num_images: int = 4,
                           seed: int = 0) -> Dict[str, Any]:
    """The activation scales of ``cfg``'s detector (Faster / Mask R-CNN, FPN or C4; ``cfg`` is not
    modified) as initialised on CPU from torch seed ``seed`` ("fresh"; the caller's RNG state is kept)
    and with ``weights_path`` loaded over that init by DetectionCheckpointer ("converted"). Both run in
    training mode (BatchNorm on batch statistics, as in the first fine-tuning iterations) under no_grad
    without losses on the same ``num_images`` test-time-resized images of ``dataset_name`` (default
    DATASETS.TEST[0], else TRAIN[0]; an LVIS_CUSTOM entry is registered); the logits of both come
    from the fresh box predictor, the one fine-tuning starts from. Returns::

        {"weights", "dataset", "seed", "arch" ("fpn" | "c4"), "num_images", "num_boxes", "image_ids",
         "input_sizes" ([h, w] per image), "normalization",
         "fresh" / "converted": {"features": {level: {"std", "channel_mean_spread"}}, "fc7_norm",
                                 "cls_logit_std", "cls_logit_max_abs", "rpn_objectness_std" (None without RPN)},
         "ratio": the structure of "fresh", converted / fresh (None where fresh is 0)}

    Raises DatasetUnavailableError (dataset not registered, unreadable or without boxes) and
    TransferScaleError (not a supported R-CNN).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    name = _dataset_name(cfg, dataset_name)
    inputs = _mapped_inputs(cfg, name, num_images, seed)  # before building: fail fast
    fresh, converted = _build_pair(cfg, weights_path, seed)
    predictor = fresh.roi_heads.box_predictor
    predictor_copy = copy.deepcopy(predictor)  # the same weights for both runs
    measured_fresh = _measure_model(fresh, predictor, inputs)
    measured_converted = _measure_model(converted, predictor_copy, inputs)
    return dict(weights=str(weights_path), dataset=name, seed=seed,
                arch="fpn" if hasattr(fresh.backbone, "bottom_up") else "c4", num_images=len(inputs),
                num_boxes=sum(len(d["instances"]) for d in inputs), image_ids=[d.get("image_id") for d in inputs],
                input_sizes=[list(d["image"].shape[-2:]) for d in inputs], normalization=NORMALIZATION_NOTE,
                fresh=measured_fresh, converted=measured_converted, ratio=_ratios(measured_converted, measured_fresh))


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def check_transfer_scale(result: Mapping[str, Any], *, fpn_std_ratio_range: Tuple[float, float] = FPN_STD_RATIO_RANGE,
                         fc7_norm_ratio_max: float = FC7_NORM_RATIO_MAX,
                         max_abs_cls_logit: float = MAX_ABS_CLS_LOGIT) -> List[str]:
    """Warnings for the scales of :func:`measure_transfer_scale`'s ``result`` outside the goals: each
    FPN level's std within ``fpn_std_ratio_range`` of the fresh model's; the box features' norm at most
    ``fc7_norm_ratio_max`` times the fresh one; the fresh classifier's max |logit| on the converted box
    features below ``max_abs_cls_logit``. C4 backbone features are not checked; non-finite values
    are always warned about."""
    fresh, converted, ratio = result["fresh"], result["converted"], result["ratio"]
    warnings: List[str] = []
    lo, hi = fpn_std_ratio_range
    if result.get("arch") == "fpn":
        for level, stats in ratio["features"].items():
            r = stats["std"]
            if r is None or not math.isfinite(r) or not lo <= r <= hi:
                warnings.append(
                    f"FPN {level}: output std ratio converted/fresh {_fmt(r)} is outside "
                    f"[{lo:g}, {hi:g}] (converted {_fmt(converted['features'][level]['std'])}, "
                    f"fresh {_fmt(fresh['features'][level]['std'])}; per-channel-mean spread "
                    f"{_fmt(converted['features'][level]['channel_mean_spread'])} vs "
                    f"{_fmt(fresh['features'][level]['channel_mean_spread'])})"
                )
    r = ratio["fc7_norm"]
    if r is None or not math.isfinite(r) or r > fc7_norm_ratio_max:
        warnings.append(
            f"box head fc7: mean L2 norm per box ratio converted/fresh {_fmt(r)} > "
            f"{fc7_norm_ratio_max:g} (converted {_fmt(converted['fc7_norm'])}, "
            f"fresh {_fmt(fresh['fc7_norm'])})"
        )
    m = converted["cls_logit_max_abs"]
    if m is None or not math.isfinite(m) or m >= max_abs_cls_logit:
        warnings.append(
            f"box predictor: the freshly initialised classifier reaches max |logit| {_fmt(m)} "
            f">= {max_abs_cls_logit:g} on the converted box features (fresh model "
            f"{_fmt(fresh['cls_logit_max_abs'])}): fine-tuning starts from confident random scores"
        )
    r = ratio.get("rpn_objectness_std")
    if converted.get("rpn_objectness_std") is not None and (r is None or not math.isfinite(r)):
        warnings.append(f"RPN objectness: logit std ratio converted/fresh is {_fmt(r)}")
    return warnings


def format_scale_table(result: Mapping[str, Any]) -> str:
    """The measurement as a text table (quantity, fresh, converted, ratio, goal)."""
    fresh, converted, ratio = result["fresh"], result["converted"], result["ratio"]
    lo, hi = FPN_STD_RATIO_RANGE
    fpn = result.get("arch") == "fpn"
    rows = []
    for level in fresh["features"]:
        for key, label in (("std", "std"), ("channel_mean_spread", "channel-mean spread")):
            rows.append([f"{'FPN ' if fpn else ''}{level} {label}"]
                        + [_fmt(r["features"][level][key]) for r in (fresh, converted, ratio)]
                        + [f"ratio {lo:g}-{hi:g}" if fpn and key == "std" else ""])
    for label, key, goal in (
        ("box head fc7 L2 norm / box" if fpn else "res5 box feature L2 norm / box", "fc7_norm",
         f"ratio <= {FC7_NORM_RATIO_MAX:g}"),
        ("classifier logit std", "cls_logit_std", ""),
        ("classifier max |logit|", "cls_logit_max_abs", f"converted < {MAX_ABS_CLS_LOGIT:g}"),
        ("RPN objectness logit std", "rpn_objectness_std", ""),
    ):
        rows.append([label] + [_fmt(r[key]) for r in (fresh, converted, ratio)] + [goal])
    title = (
        f"transfer scale on {result['num_images']} images ({result['num_boxes']} ground-truth boxes) "
        f"of {result['dataset']}, fresh vs converted model (seed {result['seed']}):\n"
        f"  {result['normalization']}"
    )
    table = tabulate(rows, headers=["quantity", "fresh", "converted", "converted/fresh", "goal"],
                     tablefmt="simple", disable_numparse=True,
                     colalign=("left", "right", "right", "right", "left"))
    return title + "\n" + table


def report_transfer_scale(cfg, weights_path: str, dataset_name: Optional[str], num_images: int) -> Optional[Dict[str, Any]]:
    """Measure, print and save (``<weights_path>.scale.json``) the transfer scale of converted weights.
    When it cannot be measured it prints why, removes an outdated json and returns None: the
    conversion stands. Warnings go to the log and to stdout, never to an exit status."""
    logger = logging.getLogger(__name__)
    json_path = weights_path + ".scale.json"
    try:
        result = measure_transfer_scale(cfg, weights_path, dataset_name=dataset_name, num_images=num_images)
    except Exception as e:  # noqa: BLE001 - the weights are written and verified: report, don't fail
        if isinstance(e, DatasetUnavailableError):
            reason = (f"{e}. Give --scale-dataset NAME (a registered dataset or a DATASETS.LVIS_CUSTOM entry "
                      "of the config, e.g. through --opts) or --scale-images 0")
        elif isinstance(e, TransferScaleError):
            reason = str(e)
        else:
            logger.exception("transfer-scale measurement failed")
            reason = f"the measurement failed: {type(e).__name__}: {e}"
        print(f"\ntransfer scale: not measured: {reason}")
        if os.path.exists(json_path):  # it described the previous weights
            os.unlink(json_path)
            print(f"transfer scale: removed the outdated {json_path}")
        return None
    result["goals"] = {"fpn_std_ratio_range": list(FPN_STD_RATIO_RANGE), "fc7_norm_ratio_max": FC7_NORM_RATIO_MAX,
                       "max_abs_cls_logit_below": MAX_ABS_CLS_LOGIT}
    result["warnings"] = check_transfer_scale(result)
    print("\n" + format_scale_table(result))
    for w in result["warnings"]:
        logger.warning("transfer scale: %s", w)
        print(f"WARNING: {w}")
    try:  # strict JSON: NaN / inf become null (the warnings name them)
        atomic_write_json(_json_safe(result), json_path, indent=2, allow_nan=False)
    except OSError as e:
        print(f"transfer scale: could not write {json_path}: {e}")
    else:
        print(f"wrote {json_path}")
    return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
