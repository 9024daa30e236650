"""Figures of what a model computes (``python -m drcl_d2.tools.plots {attention,predictions}``).

Both build the config's model with detectron2's DefaultPredictor (its test-time resize and input
format) and load each checkpoint with DetectionCheckpointer, reporting what it set. ``attention``:
per FPN level or ResNet stage, the feature magnitude over channels on the image's unpadded cells,
min-max normalised and upsampled onto the image (only the backbone runs). ``predictions``: boxes
and masks above a score, drawn by detectron2's Visualizer with MetadataCatalog's class names.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from drcl_d2.utils import load_config, name_some, seeded_rng, unpadded_size

from .plots import PlotResult, labeled_paths, new_figure, save_png

logger = logging.getLogger(__name__)

__all__ = ["feature_magnitude_maps", "load_weights", "plot_attention", "plot_predictions"]

FPN_LEVELS = ("p2", "p3", "p4", "p5")
RESNET_STAGES = ("res2", "res3", "res4", "res5")


def _predictor(config: str, opts: Sequence[str], seed: int = 0):
    """DefaultPredictor on CPU without weights (each figure loads its own), seeded: the heads a
    checkpoint lacks start the same on every call."""
    from detectron2.engine import DefaultPredictor

    cfg = load_config(config, opts, device="cpu")
    cfg.MODEL.WEIGHTS = ""
    with seeded_rng(seed):
        return DefaultPredictor(cfg)


def load_weights(model, path: str, label: str, backbone_prefix: str | None = None) -> dict:
    """Load ``path`` into ``model`` with DetectionCheckpointer and report what it set: detectron2 .pth,
    drcl-convert / model-zoo .pkl (suffix matching), this project's pretraining checkpoints (their online
    modules carry GeneralizedRCNN names). With ``backbone_prefix``, a ValueError when no backbone
    tensor loaded or a backbone shape differs."""
    from drcl_d2.engine.checkpoint import AtomicDetectionCheckpointer, quiet_checkpoint_logs

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {label!r}: checkpoint not found: {path}")
    checkpointer = AtomicDetectionCheckpointer(model, save_to_disk=False)
    try:
        with quiet_checkpoint_logs():  # summarised below; fvcore would name every EMA-target / queue key
            extra = checkpointer.load(path)
    except Exception as e:  # noqa: BLE001 - any load failure names the file
        raise ValueError(f"weights {label!r}: cannot load {path}: {type(e).__name__}: {e}") from e
    inc, meta = checkpointer.incompatible, extra.get("drcl_d2")
    source = (f"drcl_d2 {meta.get('method', '?')} pretraining checkpoint (loaded by name)" if isinstance(meta, dict)
              else "weights matched by name heuristics (.pkl: drcl-convert / model zoo)"
              if extra.get("matching_heuristics") else "detectron2 checkpoint")
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    bad = {k: (tuple(c), tuple(m)) for k, c, m in inc.incorrect_shapes}
    loaded = {k for k in keys if k not in set(inc.missing_keys) and k not in bad}
    report = {"label": label, "path": path, "source": source, "loaded": len(loaded), "total": len(keys),
              "unexpected": len(inc.unexpected_keys), "incorrect_shapes": bad,
              "missing": sorted(k for k in inc.missing_keys if not k.endswith("num_batches_tracked"))}
    if backbone_prefix is not None:
        part = [k for k in keys if k.startswith(backbone_prefix)]
        report["backbone_loaded"], report["backbone_total"] = len(loaded.intersection(part)), len(part)
        bad_part = [k for k in bad if k.startswith(backbone_prefix)]
        if bad_part:
            raise ValueError(f"weights {label!r} ({path}): backbone shapes differ from the config's model, e.g. "
                             + ", ".join(f"{k} {bad[k][0]} vs {bad[k][1]}" for k in bad_part[:3])
                             + " (another depth or width? check --config / --opts)")
        if not report["backbone_loaded"]:
            raise ValueError(f"weights {label!r} ({path}): no backbone tensor matches the model built from the config "
                             f"(model names start with {backbone_prefix!r}; the checkpoint's unexpected keys: "
                             f"{len(inc.unexpected_keys)}). Convert it with drcl-convert or use the config it was trained with.")
    logger.info(f"{label}: {path}: {source}; {len(loaded)}/{len(keys)} model tensors loaded, "
                f"{len(inc.unexpected_keys)} checkpoint keys unused")
    return report


def _images(images, dataset_json: str | None, image_root: str | None,
            num_images: int) -> tuple[list[str], str | None]:
    """(paths, dataset): the explicit image files, or the first ``num_images`` of ``dataset_json``
    registered as an LVIS-format dataset (by that name; None for files)."""
    from detectron2.data import DatasetCatalog

    from ..data.datasets import register_lvis_format

    if bool(images) == bool(dataset_json):
        raise ValueError("give either --images PATH ... or --dataset-json J [--image-root R]")
    dataset = None
    if dataset_json:
        if num_images <= 0:
            raise ValueError(f"--num-images must be > 0, got {num_images}")
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(dataset_json))
        dataset = f"drcl_plots:{os.path.abspath(dataset_json)}:{os.path.abspath(root)}"
        register_lvis_format(dataset, dataset_json, root, check_files=False)
    paths = [os.fspath(p) for p in images] if images else [d["file_name"] for d in DatasetCatalog.get(dataset)[:num_images]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {name_some(missing)}")
    return paths, dataset


def _read_bgr(path: str) -> np.ndarray:
    """An image as DefaultPredictor takes it (H, W, 3 BGR uint8)."""
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format="BGR")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _feature_backbone(model):
    """(backbone, its state-dict prefix): ``.backbone`` (GeneralizedRCNN, 2DRCL) or DetCo's online encoder."""
    from detectron2.modeling import Backbone

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone) and hasattr(model, "online_network"):
        backbone = getattr(model.online_network(), "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ValueError(f"{type(model).__name__} has no detectron2 backbone to visualise")
    prefix = next(name for name, m in model.named_modules() if m is backbone)
    return backbone, (prefix + "." if prefix else "")


def feature_magnitude_maps(predictor, bgr: np.ndarray, levels: Sequence[str], reduction: str = "l2") -> dict:
    """{level: (H, W) float32 map in [0, 1]} of one image (BGR, original size) through the predictor's
    backbone: resized and formatted as DefaultPredictor does, normalised with the model's pixel mean / std,
    padded to size_divisibility; each map cropped to the image's unpadded cells, reduced over channels,
    min-max normalised and upsampled bilinearly to the image."""
    import torch.nn.functional as F
    from detectron2.structures import ImageList

    if reduction not in ("l2", "mean_abs"):
        raise ValueError(f"reduction must be 'l2' or 'mean_abs', got {reduction!r}")
    model = predictor.model  # every meta-architecture here holds pixel_mean / pixel_std buffers
    backbone, _ = _feature_backbone(model)
    image = bgr[:, :, ::-1] if predictor.input_format == "RGB" else bgr
    image = predictor.aug.get_transform(image).apply_image(image)
    x = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    images = ImageList.from_tensors([(x - model.pixel_mean) / model.pixel_std], backbone.size_divisibility,
                                    padding_constraints=getattr(backbone, "padding_constraints", None))
    with torch.no_grad():
        feats = backbone(images.tensor)
    maps = {}
    for lvl in levels:
        rows, cols = unpadded_size(*images.image_sizes[0], backbone.output_shape()[lvl].stride)
        f = feats[lvl][0, :, :rows, :cols].float()
        m = f.norm(dim=0) if reduction == "l2" else f.abs().mean(dim=0)
        m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)  # flat: shows nothing
        # Bilinear weights are convex, so the map stays in [0, 1]; clamp guards rounding.
        up = F.interpolate(m[None, None], size=bgr.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        maps[lvl] = up.clamp_(0.0, 1.0).numpy().astype(np.float32)
    return maps


def plot_attention(config: str, weights, output: str, *, images=None, dataset_json: str | None = None,
                   image_root: str | None = None, num_images: int = 2, levels: Sequence[str] | None = None,
                   opts: Sequence[str] = (), reduction: str = "l2", alpha: float = 0.5) -> PlotResult:
    """Feature-magnitude heat maps of one or more checkpoints on the same images. Rows are images;
    columns the image, then per checkpoint each level (FPN p2..p5, or res2..res5 for a ResNet-only model
    such as DetCo / MoCo v2; ``levels`` overrides). ``weights``: {label: path}, (label, path) pairs or
    'LABEL=PATH' strings. data["maps"][label][level]: per-image (H, W) maps."""
    pairs = labeled_paths(weights, "--weights")
    paths, _ = _images(images, dataset_json, image_root, num_images)
    shown = [_read_bgr(p) for p in paths]
    maps, reports, chosen = {}, {}, None
    for label, wpath in pairs:
        predictor = _predictor(config, opts)
        backbone, prefix = _feature_backbone(predictor.model)
        available = list(backbone.output_shape())
        if chosen is None:
            chosen = list(levels) if levels else next(
                ([lv for lv in group if lv in available] for group in (FPN_LEVELS, RESNET_STAGES)
                 if any(lv in available for lv in group)), available)
            if set(chosen) - set(available):
                raise ValueError(f"levels {sorted(set(chosen) - set(available))} are not outputs of the backbone "
                                 f"of {config} (available: {available})")
        reports[label] = load_weights(predictor.model, wpath, label, backbone_prefix=prefix)
        per_image = [feature_magnitude_maps(predictor, bgr, chosen, reduction) for bgr in shown]
        maps[label] = {lvl: [m[lvl] for m in per_image] for lvl in chosen}

    n_cols = 1 + len(pairs) * len(chosen)
    aspect = shown[0].shape[0] / shown[0].shape[1]
    fig = new_figure(1.9 * n_cols + 0.8, max(1.6, 1.9 * aspect) * len(paths) + 0.6)
    axes = np.array(fig.subplots(len(paths), n_cols, squeeze=False))
    for i, (path, bgr) in enumerate(zip(paths, shown)):
        axes[i, 0].imshow(bgr[:, :, ::-1])
        axes[i, 0].set_ylabel(os.path.basename(path), fontsize=7)
        columns = [(label, lvl) for label, _ in pairs for lvl in chosen]
        for ax, (label, lvl) in zip(axes[i, 1:], columns):
            ax.imshow(bgr[:, :, ::-1])
            mappable = ax.imshow(maps[label][lvl][i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
            if i == 0:
                ax.set_title(f"{label}\n{lvl}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(mappable, ax=axes, shrink=0.8, fraction=0.02, label="feature magnitude (min-max)")
    fig.suptitle(f"Feature magnitude ({'L2 norm' if reduction == 'l2' else 'mean |x|'} over channels, "
                 f"min-max per map) - {os.path.basename(config)}", fontsize=9)
    return save_png(fig, output, {"images": paths, "labels": [lb for lb, _ in pairs], "levels": chosen,
                                  "reduction": reduction, "maps": maps, "weights": reports})


def _class_names(cfg, dataset: str | None) -> tuple[list[str], str]:
    """Class names from MetadataCatalog: of ``dataset``, else of the config's test sets; "class i" when
    none has MODEL.ROI_HEADS.NUM_CLASSES of them."""
    from detectron2.data import MetadataCatalog

    from ..data.datasets import ensure_dataset_metadata

    for name in ([dataset] if dataset else []) + list(cfg.DATASETS.TEST):
        try:
            ensure_dataset_metadata(name)
        except (OSError, ValueError, KeyError) as e:
            logger.info(f"class names: {name} unusable ({e})")
            continue
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        if classes and len(classes) == cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            # a --dataset-json's internal name ("drcl_plots:<json>:<root>") is shown as its json file
            return list(classes), meta.get("json_file", name) if name.startswith("drcl_plots:") else name
    return [f"class {i}" for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)], "generic"


def plot_predictions(config: str, weights, output: str, *, images=None, dataset_json: str | None = None,
                     image_root: str | None = None, num_images: int = 2, score_thresh: float = 0.3,
                     opts: Sequence[str] = ()) -> PlotResult:
    """Predicted boxes and masks (score >= score_thresh) drawn by detectron2's Visualizer. Rows are
    images, columns checkpoints. ``weights``: a path, {label: path}, pairs or 'LABEL=PATH'.
    data["instances"][label] lists per image {"boxes" (n, 4) XYXY, "scores", "classes"}."""
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import Visualizer

    # The model drops low scores itself (cheaper mask pasting), as detectron2's demo does.
    opts = list(opts) + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(score_thresh),
                         "MODEL.RETINANET.SCORE_THRESH_TEST", str(score_thresh)]
    pairs = labeled_paths(weights, "--weights")
    paths, dataset = _images(images, dataset_json, image_root, num_images)
    instances, drawn, reports, names = {}, {}, {}, None
    for label, wpath in pairs:
        predictor = _predictor(config, opts)
        if hasattr(predictor.model, "online_network"):
            raise ValueError(f"{config}: META_ARCHITECTURE {predictor.cfg.MODEL.META_ARCHITECTURE} is a pretraining "
                             "model; predictions need a detector config (e.g. GeneralizedRCNN)")
        if names is None:
            names, names_source = _class_names(predictor.cfg, dataset)
            metadata = Metadata(name="drcl_plots").set(thing_classes=names)
        report = reports[label] = load_weights(predictor.model, wpath, label)
        if report["incorrect_shapes"]:
            k, (c, m) = next(iter(report["incorrect_shapes"].items()))
            raise ValueError(f"weights {label!r} ({wpath}): {len(report['incorrect_shapes'])} tensors differ in "
                             f"shape from the config's model, e.g. {k} {c} vs {m} (set "
                             "MODEL.ROI_HEADS.NUM_CLASSES to the checkpoint's with --opts)")
        untrained = [k for k in report["missing"] if ".box_predictor." in k]
        if untrained:
            raise ValueError(f"weights {label!r} ({wpath}) has no trained box predictor ({untrained[0]} "
                             "missing): predictions need a fine-tuned detector, not a pretraining checkpoint")
        instances[label], drawn[label] = [], []
        for path in paths:
            bgr = _read_bgr(path)
            out = predictor(bgr)["instances"].to("cpu")
            out = out[out.scores >= score_thresh]
            instances[label].append({"boxes": out.pred_boxes.tensor.numpy(), "scores": out.scores.numpy(),
                                     "classes": out.pred_classes.numpy()})
            scale = float(np.clip(640 / max(bgr.shape[:2]), 0.5, 4.0))  # readable labels on tiny and huge images
            drawn[label].append(Visualizer(bgr[:, :, ::-1], metadata, scale=scale).draw_instance_predictions(out).get_image())

    first = drawn[pairs[0][0]][0]
    fig = new_figure(max(6.0, 4.2 * len(pairs) + 0.4), 4.2 * min(1.5, first.shape[0] / first.shape[1]) * len(paths) + 0.8)
    axes = np.array(fig.subplots(len(paths), len(pairs), squeeze=False))
    for j, (label, _) in enumerate(pairs):
        for i, path in enumerate(paths):
            axes[i, j].imshow(drawn[label][i])
            axes[i, j].set_title(f"{label}: {len(instances[label][i]['scores'])} detections", fontsize=8)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(os.path.basename(path), fontsize=7)
    fig.suptitle(f"Predictions with score >= {score_thresh:g}\n{os.path.basename(config)}; class names: "
                 f"{names_source}", fontsize=9)
    return save_png(fig, output, {"images": paths, "labels": [lb for lb, _ in pairs], "score_thresh": float(score_thresh),
                                  "instances": instances, "class_names": names, "class_names_source": names_source,
                                  "weights": reports})
