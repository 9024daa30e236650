"""PNG figures of a dataset's long tail and of drcl_d2 runs (matplotlib, Agg; no display needed).

    python -m drcl_d2.tools.plots longtail TRAIN_JSON [--image-root R] [--repeat-thresh 0.1] --output longtail.png
    python -m drcl_d2.tools.plots drb-schedule RUN_DIR_OR_METRICS_JSON --output drb.png
    python -m drcl_d2.tools.plots ap-groups --run RFS=output/rfs --run DRB=output/drb --output ap.png
    python -m drcl_d2.tools.plots attention --config CFG.yaml --weights init=a.pth --weights 2DRCL=b.pkl \
        (--images IMG [IMG ...] | --dataset-json J --image-root R --num-images N) --output attn.png [--opts K V ...]
    python -m drcl_d2.tools.plots predictions --config CFG.yaml --weights model_final.pth \
        (--images ... | --dataset-json ...) [--score-thresh 0.3] --output pred.png [--opts K V ...]

Figures:

* ``longtail``: training images per category, sorted, log scale, coloured by LVIS frequency group
  (rare 1-10 / common 11-100 / frequent >100 images; the json's ``frequency`` when present, else
  computed from the counts), and the Dynamic Rebalancing repeat factors r_c at α_d = 0, 0.5, 1
  (α_d = 0 is detectron2's RFS).
* ``drb-schedule``: α_d and the epoch length Σ r_I (and mean r_I) over the iterations, from the
  ``drb/*`` scalars a DynamicRepeatFactorTrainingSampler run logs to metrics.json.
* ``ap-groups``: AP, APr, APc, APf of several runs side by side (bbox and segm panels), from
  the last evaluation in each metrics.json. LVIS reports -100 for a group without detections;
  it is drawn as a hatched 0 bar marked "x".
* ``attention``: feature-magnitude maps (per location the L2 norm, or mean |x|, over channels,
  min-max normalised per map, upsampled onto the image) of one or more checkpoints on the same
  images, per FPN level p2-p5 or ResNet stage res2-res5. Only the backbone runs.
* ``predictions``: boxes and masks of a fine-tuned detector, drawn with detectron2's Visualizer.

Every function writes its PNG atomically (temporary file + os.replace) and returns a
:class:`PlotResult` ``(path, data)``: ``data`` holds the numbers that were plotted. Missing or
malformed inputs raise FileNotFoundError / ValueError naming the file (and line or key); the
command line prints that message and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from drcl_d2.utils import COMMON_MAX_IMAGES, RARE_MAX_IMAGES, atomic_write, frequency_group, load_config, unpadded_size

logger = logging.getLogger(__name__)

__all__ = [
    "PlotResult",
    "plot_longtail",
    "plot_drb_schedule",
    "plot_ap_groups",
    "plot_attention",
    "plot_predictions",
    "make_demo_figures",
    "parse_labeled_path",
    "main",
]

GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
AP_METRICS = ("AP", "APr", "APc", "APf")
FPN_LEVELS = ("p2", "p3", "p4", "p5")
RESNET_STAGES = ("res2", "res3", "res4", "res5")


class PlotResult(NamedTuple):
    """What every plot function returns: the PNG written and the numbers it shows."""

    path: str
    data: dict


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend state, nothing to close, safe in threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, output: str, dpi: int = 100) -> str:
    """Write `fig` as PNG to `output` atomically: a reader never sees a half-written file."""
    output = os.fspath(output)
    atomic_write(output, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight",
                                               pad_inches=0.1))  # no clipped labels
    logger.info(f"Wrote {output}")
    return output


def parse_labeled_path(spec: str, what: str = "--run") -> tuple[str, str]:
    """'LABEL=PATH' -> (LABEL, PATH); a bare PATH is labelled by its file or folder name."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        if not label or not path:
            raise ValueError(f"{what} {spec!r}: expected LABEL=PATH")
        return label, path
    if not spec:
        raise ValueError(f"{what}: empty path")
    name = os.path.basename(os.path.normpath(spec))
    if name == "metrics.json":  # a run's metrics file: the run folder names it better
        name = os.path.basename(os.path.dirname(os.path.abspath(spec)))
    return os.path.splitext(name)[0] or spec, spec


def _labeled(items, what: str) -> list[tuple[str, str]]:
    """A mapping, (label, path) pairs or 'LABEL=PATH' strings -> unique (label, path) pairs."""
    if isinstance(items, (str, os.PathLike)):
        items = [os.fspath(items)]
    pairs = list(items.items()) if isinstance(items, Mapping) else [
        parse_labeled_path(i, what) if isinstance(i, str) else tuple(i) for i in items]
    if not pairs:
        raise ValueError(f"{what}: give at least one LABEL=PATH")
    labels = [label for label, _ in pairs]
    dup = sorted({label for label in labels if labels.count(label) > 1})
    if dup:
        raise ValueError(f"{what}: labels must be distinct, repeated: {dup}")
    return [(str(label), os.fspath(path)) for label, path in pairs]


def _metrics_file(path: str) -> str:
    """A run folder -> its metrics.json; a file stays as it is. Missing -> FileNotFoundError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        metrics = os.path.join(path, "metrics.json")
        if not os.path.isfile(metrics):
            raise FileNotFoundError(f"{path}: run folder without metrics.json (did training start?)")
        return metrics
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    return path


def read_final_metrics(metrics_json: str) -> dict:
    """The last evaluation in a detectron2 metrics.json: {"bbox": {AP: ..}, "segm": {..}}."""
    if not os.path.isfile(metrics_json):
        raise FileNotFoundError(f"{metrics_json} not found: did training run?")
    results = {}
    for _, record in _metrics_records(metrics_json):
        for key, value in record.items():
            task, _, metric = key.partition("/")
            if task in ("bbox", "segm") and metric:
                results.setdefault(task, {})[metric] = value
    if not results:
        raise ValueError(f"{metrics_json} holds no bbox/segm evaluation results")
    return results


def _metrics_records(metrics_json: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a detectron2 metrics.json (one JSON object per line)."""
    with open(metrics_json) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_json}:{line_no} is not a JSON line: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{metrics_json}:{line_no} is not a JSON object (found {type(record).__name__})")
            yield line_no, record


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, found {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# 1. long tail + DRB repeat factors
# ---------------------------------------------------------------------------------------------
def longtail_data(train_json: str, image_root: str | None = None, repeat_thresh: float = 0.1,
                  alphas: Sequence[float] = (0.0, 0.5, 1.0),
                  instance_frequency: str = "fraction_of_instances", filter_empty: bool = True) -> dict:
    """The numbers of the long-tail figure, categories sorted by training images (descending).

    Counts come from the annotations as the training loader sees them (images without
    annotations dropped when `filter_empty`, as detectron2's FILTER_EMPTY_ANNOTATIONS), so r_c
    are exactly the factors DRB / RFS use; the frequency group is the json's when present.
    """
    from ..data.datasets import load_lvis_format_json, read_json_file
    from ..data.rebalance import CategoryStatistics, DynamicRepeatFactors

    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(train_json))
    raw = read_json_file(train_json)
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), list):
        raise ValueError(f"{train_json}: missing top-level key 'categories' (LVIS format needs it)")
    if any(not isinstance(c, dict) or "id" not in c for c in raw["categories"]):
        raise ValueError(f"{train_json}: a category entry has no 'id'")
    categories = sorted(raw["categories"], key=lambda c: c["id"])  # the loader's contiguous order
    del raw  # LVIS train is ~1 GB of json: do not hold two copies
    dicts = load_lvis_format_json(train_json, image_root, check_files=False)
    if filter_empty:
        dicts = [d for d in dicts if d["annotations"]]
    if not dicts:
        raise ValueError(f"{train_json}: no image has an annotation, so there is no long tail to plot")
    stats = CategoryStatistics.from_dataset_dicts(dicts)
    drb = DynamicRepeatFactors(stats, repeat_thresh, instance_frequency)

    num_cats = len(categories)
    image_counts = np.zeros(num_cats, dtype=np.int64)
    instance_counts = np.zeros(num_cats, dtype=np.int64)
    image_counts[stats.category_ids] = stats.image_counts  # stats ids are contiguous 0..C-1
    instance_counts[stats.category_ids] = stats.instance_counts
    factors = {}
    for a in alphas:
        r = np.ones(num_cats)  # a category without training images never raises a factor
        r[stats.category_ids] = drb.category_factors(float(a))
        factors[float(a)] = r

    json_freq = [c.get("frequency") for c in categories]
    has = [f in GROUPS for f in json_freq]
    frequency = [f if ok else frequency_group(int(n)) for f, ok, n in zip(json_freq, has, image_counts)]
    source = "json" if all(has) else ("computed" if not any(has) else "json+computed")

    # Descending count; ties by category id, so the order is deterministic.
    order = np.lexsort((np.array([c["id"] for c in categories]), -image_counts))
    return {
        "json": train_json,
        "num_images": stats.num_images,
        "num_instances": stats.num_instances,
        "repeat_thresh": float(repeat_thresh),
        "instance_frequency": instance_frequency,
        "category_ids": [categories[i]["id"] for i in order],
        "names": [str(categories[i].get("name", categories[i]["id"])) for i in order],
        "image_counts": image_counts[order],
        "instance_counts": instance_counts[order],
        "frequency": [frequency[i] for i in order],
        "frequency_source": source,
        "band_counts": {g: sum(f == g for f in frequency) for g in GROUPS},
        "repeat_factors": {a: r[order] for a, r in factors.items()},
    }


def plot_longtail(train_json: str, output: str, image_root: str | None = None, repeat_thresh: float = 0.1,
                  alphas: Sequence[float] = (0.0, 0.5, 1.0),
                  instance_frequency: str = "fraction_of_instances") -> PlotResult:
    """Images per category (log scale, r/c/f colours) and DRB's r_c at several α_d. See longtail_data."""
    data = longtail_data(train_json, image_root, repeat_thresh, alphas, instance_frequency)
    counts, freq = data["image_counts"], data["frequency"]
    x = np.arange(len(counts))
    fig = _new_figure(max(7.0, 0.12 * len(x) + 3), 7.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)

    colors = [GROUP_COLORS[f] for f in freq]
    # A category without training images has no bar on a log axis: mark it at the bottom.
    ax1.bar(x, np.where(counts > 0, counts, np.nan), width=1.0, color=colors, edgecolor="none")
    ax1.set_yscale("log")
    for t in (RARE_MAX_IMAGES, COMMON_MAX_IMAGES):
        ax1.axhline(t, color="grey", lw=0.8, ls="--")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=GROUP_COLORS[g], label=f"{GROUP_NAMES[g]} ({data['band_counts'][g]})") for g in GROUPS]
    handles.append(Line2D([], [], color="grey", lw=0.8, ls="--", label="10 / 100 images"))
    ax1.legend(handles=handles, title=f"group (from {data['frequency_source']})", fontsize=8,
               title_fontsize=8, loc="upper right")
    ax1.set_ylabel("training images per category")
    ax1.set_title(f"Long tail of {os.path.basename(train_json)}: {len(x)} categories, "
                  f"{data['num_images']} images, {data['num_instances']} instances")
    if (counts == 0).any():
        ax1.text(0.01, 0.02, f"{int((counts == 0).sum())} categories without training images",
                 transform=ax1.transAxes, fontsize=8)

    for (a, r), style in zip(data["repeat_factors"].items(), ("-", "--", ":", "-.")):
        ax2.plot(x, r, ls=style, marker="o", ms=3, label=f"α_d = {a:g}" + (" (= RFS)" if a == 0 else ""))
    ax2.set_ylabel("repeat factor r_c")
    ax2.set_xlabel("categories, sorted by training images")
    ax2.set_title(f"Dynamic Rebalancing r_c = max(1, sqrt(t / f_c)), t = {data['repeat_thresh']:g}, "
                  f"f_in: {data['instance_frequency']}", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if len(x) <= 40:  # names stay readable up to about LVIS-subset size
        ax2.set_xticks(x, data["names"], rotation=90, fontsize=7)
    return PlotResult(_save_png(fig, output), data)


# ---------------------------------------------------------------------------------------------
# 2. DRB schedule
# ---------------------------------------------------------------------------------------------
DRB_KEYS = {"drb/alpha": "alpha", "drb/epoch_length": "epoch_length", "drb/mean_repeat": "mean_repeat"}


def drb_schedule_data(metrics: str) -> dict:
    """α_d, epoch length and mean r_I per logged iteration (a resumed run's later lines win)."""
    metrics_json = _metrics_file(metrics)
    by_iter: dict[int, dict] = {}
    for line_no, record in _metrics_records(metrics_json):
        values = {name: record[key] for key, name in DRB_KEYS.items() if key in record}
        if not values:
            continue
        if "iteration" not in record:
            raise ValueError(f"{metrics_json}:{line_no} has drb/* values but no 'iteration'")
        it = int(_number(record["iteration"], f"{metrics_json}:{line_no} 'iteration'"))
        entry = by_iter.setdefault(it, {})
        for name, v in values.items():
            entry[name] = _number(v, f"{metrics_json}:{line_no} 'drb/{name}'")
    if not by_iter:
        raise ValueError(
            f"{metrics_json} holds no drb/* values (drb/alpha, drb/epoch_length, drb/mean_repeat): "
            "was the run trained with DynamicRepeatFactorTrainingSampler?")
    iters = sorted(by_iter)
    out = {"metrics_json": metrics_json, "iteration": np.array(iters, dtype=np.int64)}
    for name in DRB_KEYS.values():
        out[name] = np.array([by_iter[i].get(name, np.nan) for i in iters], dtype=np.float64)
    return out


def plot_drb_schedule(metrics: str, output: str) -> PlotResult:
    """α_d (top) and epoch length Σ r_I with mean r_I (bottom) over the iterations of one run."""
    data = drb_schedule_data(metrics)
    it = data["iteration"]
    fig = _new_figure(7.0, 5.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    # Factors are constant within a DRB period, so the logged values are drawn as steps.
    ax1.plot(it, data["alpha"], drawstyle="steps-post", marker=".", color="tab:purple")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_ylabel("α_d = T / T_max")
    ax1.set_title(f"Dynamic Rebalancing schedule ({data['metrics_json']})", fontsize=10)
    ax1.grid(alpha=0.3)
    ax2.plot(it, data["epoch_length"], drawstyle="steps-post", marker=".", color="tab:green",
             label="epoch length Σ r_I")
    ax2.set_ylabel("epoch length Σ r_I (images)", color="tab:green")
    ax2.set_xlabel("iteration")
    ax2.grid(alpha=0.3)
    if np.isfinite(data["mean_repeat"]).any():
        twin = ax2.twinx()
        twin.plot(it, data["mean_repeat"], drawstyle="steps-post", ls="--", color="tab:grey",
                  label="mean r_I")
        twin.set_ylabel("mean r_I", color="tab:grey")
    return PlotResult(_save_png(fig, output), data)


# ---------------------------------------------------------------------------------------------
# 3. AP by frequency group
# ---------------------------------------------------------------------------------------------
def ap_groups_data(runs, metrics: Sequence[str] = AP_METRICS) -> dict:
    """Final bbox / segm AP, APr, APc, APf of each run: values[task][label][metric] (NaN if absent)."""
    pairs = _labeled(runs, "--run")
    values: dict[str, dict[str, dict[str, float]]] = {}
    files = {}
    for label, path in pairs:
        metrics_json = _metrics_file(path)
        files[label] = metrics_json
        final = read_final_metrics(metrics_json)
        for task, task_values in final.items():
            for m in metrics:
                if m in task_values:
                    v = _number(task_values[m], f"{metrics_json} '{task}/{m}'")
                    values.setdefault(task, {}).setdefault(label, {})[m] = v
    tasks = [t for t in ("bbox", "segm") if t in values]
    if not tasks:
        raise ValueError(f"no bbox/* or segm/* values for {list(metrics)} in {list(files.values())}")
    labels = [label for label, _ in pairs]
    full = {t: {label: {m: values[t].get(label, {}).get(m, float("nan")) for m in metrics} for label in labels}
            for t in tasks}
    # LVIS writes -1 (x100) for a group where the model made no detection at all.
    no_det = [(t, label, m) for t in tasks for label in labels for m in metrics if full[t][label][m] < 0]
    return {"labels": labels, "files": files, "tasks": tasks, "metrics": list(metrics), "values": full,
            "no_detections": no_det}


def plot_ap_groups(runs, output: str, metrics: Sequence[str] = AP_METRICS) -> PlotResult:
    """Grouped bars of AP / APr / APc / APf per run; one panel per task (bbox, segm).

    `runs`: {label: run folder or metrics.json}, (label, path) pairs or 'LABEL=PATH' strings.
    """
    data = ap_groups_data(runs, metrics)
    labels, tasks, metrics = data["labels"], data["tasks"], data["metrics"]
    fig = _new_figure(max(5.0, 1.2 + len(metrics) * (0.5 + 0.35 * len(labels))) * len(tasks), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=True))
    width = 0.8 / len(labels)
    x = np.arange(len(metrics))
    cmap = [f"C{i % 10}" for i in range(len(labels))]
    for ax, task in zip(axes, tasks):
        for j, label in enumerate(labels):
            vals = np.array([data["values"][task][label][m] for m in metrics])
            pos = x - 0.4 + width * (j + 0.5)
            shown = np.where(vals < 0, 0.0, vals)
            bars = ax.bar(pos, np.nan_to_num(shown), width, color=cmap[j], label=label)
            for b, v, p in zip(bars, vals, pos):
                if np.isnan(v):
                    ax.text(p, 0.5, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                elif v < 0:
                    b.set_hatch("//")
                    b.set_edgecolor(cmap[j])
                    ax.plot([p], [0], marker="x", color="black", ms=7, zorder=3)
                else:
                    ax.text(p, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, metrics)
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AP (%)")
    axes[-1].legend(fontsize=8)
    if data["no_detections"]:
        # supxlabel, unlike fig.text, gets room from the constrained layout.
        fig.supxlabel("x (hatched 0): LVIS reported -100, no detections in that group: "
                      + ", ".join(f"{lb} {t} {m}" for t, lb, m in data["no_detections"][:6]), fontsize=7)
    fig.suptitle("AP by LVIS frequency group (last evaluation of each run)", fontsize=10)
    return PlotResult(_save_png(fig, output), data)


# ---------------------------------------------------------------------------------------------
# models, weights and images (attention, predictions)
# ---------------------------------------------------------------------------------------------
def _build_cfg(config: str, opts: Sequence[str] = ()):
    """The config on CPU, MODEL.WEIGHTS cleared (each figure loads its own weights)."""
    cfg = load_config(config, opts, device="cpu")
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _feature_backbone(model):
    """The feature extractor: `.backbone` (GeneralizedRCNN, DRCL) or the online encoder (DetCo/MoCo)."""
    from detectron2.modeling import Backbone

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone) and hasattr(model, "online_network"):
        backbone = getattr(model.online_network(), "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ValueError(f"{type(model).__name__} has no detectron2 backbone to visualise")
    prefix = next(name for name, m in model.named_modules() if m is backbone)
    return backbone, (prefix + "." if prefix else "")


def _load_weights(model, path: str, label: str, required_prefix: str | None = None) -> dict:
    """Load `path` into `model` with DetectionCheckpointer and say what was loaded.

    Works for detectron2 .pth, drcl-convert / model-zoo .pkl (name heuristics) and this
    project's raw pretraining checkpoints (their online modules carry GeneralizedRCNN names).
    Raises ValueError when no tensor under `required_prefix` was loaded or a shape differs.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    class _Recording(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.meta = checkpoint.get("drcl_d2")
            self.heuristics = bool(checkpoint.get("matching_heuristics", False))
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

        def _log_incompatible_keys(self, incompatible):
            pass  # summarised below; the raw lists would name every EMA-target / queue key

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {label!r}: checkpoint not found: {path}")
    ckpt = _Recording(model)
    try:
        ckpt.load(path)
    except Exception as e:
        raise ValueError(f"weights {label!r}: cannot load {path}: {type(e).__name__}: {e}") from e
    inc = ckpt.incompatible
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    missing = set(inc.missing_keys)
    bad = {k: (tuple(c), tuple(m)) for k, c, m in inc.incorrect_shapes}
    loaded = [k for k in keys if k not in missing and k not in bad]
    meta = ckpt.meta if isinstance(ckpt.meta, dict) else None
    if meta:
        source = f"drcl_d2 {meta.get('method', '?')} pretraining checkpoint (loaded by name)"
    elif ckpt.heuristics:
        source = "weights matched by name heuristics (.pkl: drcl-convert / model zoo)"
    else:
        source = "detectron2 checkpoint"
    report = {"label": label, "path": path, "source": source, "loaded": len(loaded), "total": len(keys),
              "unexpected": len(inc.unexpected_keys), "incorrect_shapes": bad,
              "missing": sorted(k for k in missing if not k.endswith("num_batches_tracked"))}
    if required_prefix is not None:
        part = [k for k in keys if k.startswith(required_prefix)]
        part_loaded = [k for k in part if k in set(loaded)]
        report["backbone_loaded"], report["backbone_total"] = len(part_loaded), len(part)
        bad_part = [k for k in bad if k.startswith(required_prefix)]
        if bad_part:
            raise ValueError(
                f"weights {label!r} ({path}): backbone shapes differ from the config's model, e.g. "
                + ", ".join(f"{k} {bad[k][0]} vs {bad[k][1]}" for k in bad_part[:3])
                + " (another depth or width? check --config / --opts)")
        if not part_loaded:
            raise ValueError(
                f"weights {label!r} ({path}): no backbone tensor matches the model built from the config "
                f"(model names start with {required_prefix!r}; the checkpoint's unexpected keys: "
                f"{len(inc.unexpected_keys)}). Convert it with drcl-convert or use the config it was trained with.")
        logger.info(f"{label}: {path}: {source}; backbone {len(part_loaded)}/{len(part)} tensors loaded, "
                    f"model {len(loaded)}/{len(keys)}, {len(inc.unexpected_keys)} checkpoint keys unused")
    else:
        logger.info(f"{label}: {path}: {source}; {len(loaded)}/{len(keys)} model tensors loaded, "
                    f"{len(inc.unexpected_keys)} checkpoint keys unused")
    return report


def _build_model(cfg, seed: int = 0):
    """build_model on CPU, eval mode; seeded without disturbing the caller's torch RNG."""
    import torch
    from detectron2.modeling import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # heads a checkpoint lacks start the same on every call
        model = build_model(cfg)
    return model.eval()


def _image_paths(images=None, dataset_json: str | None = None, image_root: str | None = None,
                 num_images: int = 2) -> list[str]:
    """The images to draw: explicit files, or the first `num_images` (by id) of an LVIS json."""
    from ..data.datasets import image_path, read_json_file

    if images and dataset_json:
        raise ValueError("give either --images or --dataset-json, not both")
    if images:
        paths = [os.fspath(p) for p in images]
    elif dataset_json:
        if num_images <= 0:
            raise ValueError(f"--num-images must be > 0, got {num_images}")
        data = read_json_file(dataset_json)
        if not isinstance(data, dict) or not data.get("images"):
            raise ValueError(f"{dataset_json}: no 'images' to draw")
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(dataset_json))
        imgs = sorted(data["images"], key=lambda i: i.get("id", 0))[:num_images]
        paths = [image_path(root, img) for img in imgs]
    else:
        raise ValueError("no images: give --images PATH ... or --dataset-json J --image-root R")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing[:5])}"
                                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return paths


def _read_image(path: str, fmt: str) -> np.ndarray:
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format=fmt)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _test_resize(cfg, image: np.ndarray) -> np.ndarray:
    """detectron2's test-time ResizeShortestEdge (MIN_SIZE_TEST 0 means no resize)."""
    from detectron2.data import transforms as T

    if cfg.INPUT.MIN_SIZE_TEST <= 0:
        return image
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    return aug.get_transform(image).apply_image(image)


def _model_input(cfg, path: str):
    """(RGB image for display (H, W, 3) uint8, resized CHW float tensor in cfg.INPUT.FORMAT)."""
    import torch

    shown = _read_image(path, "RGB")
    model_img = _test_resize(cfg, _read_image(path, cfg.INPUT.FORMAT))
    tensor = torch.as_tensor(np.ascontiguousarray(model_img.transpose(2, 0, 1)).astype("float32"))
    return shown, tensor


# ---------------------------------------------------------------------------------------------
# 4. attention (feature magnitude) maps
# ---------------------------------------------------------------------------------------------
def _default_levels(available: Sequence[str]) -> list[str]:
    for group in (FPN_LEVELS, RESNET_STAGES):
        picked = [lvl for lvl in group if lvl in available]
        if picked:
            return picked
    return list(available)


def feature_magnitude_maps(model, cfg, image_tensor, out_size: tuple[int, int], levels: Sequence[str],
                           reduction: str = "l2") -> dict:
    """{level: (H, W) float32 map in [0, 1]} for one image (CHW float, resized, unnormalised).

    The model's pixel mean/std normalise the image, ImageList pads it to the backbone's
    size_divisibility; each map is cropped to the image's (unpadded) cells, reduced over
    channels, min-max normalised and bilinearly upsampled to `out_size` (the shown image).
    """
    import torch
    import torch.nn.functional as F
    from detectron2.structures import ImageList

    backbone, _ = _feature_backbone(model)
    mean = getattr(model, "pixel_mean", None)
    std = getattr(model, "pixel_std", None)
    mean = mean if mean is not None else torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = std if std is not None else torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    x = (image_tensor - mean) / std
    images = ImageList.from_tensors([x], backbone.size_divisibility,
                                    padding_constraints=getattr(backbone, "padding_constraints", None))
    shapes = backbone.output_shape()
    with torch.no_grad():
        feats = backbone(images.tensor)
    h, w = images.image_sizes[0]
    maps = {}
    for lvl in levels:
        rows, cols = unpadded_size(h, w, shapes[lvl].stride)
        f = feats[lvl][0, :, :rows, :cols].float()
        if reduction == "l2":
            m = f.norm(dim=0)
        elif reduction == "mean_abs":
            m = f.abs().mean(dim=0)
        else:
            raise ValueError(f"reduction must be 'l2' or 'mean_abs', got {reduction!r}")
        lo, hi = m.min(), m.max()
        m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)  # a flat map shows nothing
        # Bilinear weights are convex, so the upsampled map stays in [0, 1]; clamp guards rounding.
        up = F.interpolate(m[None, None], size=out_size, mode="bilinear", align_corners=False)[0, 0]
        maps[lvl] = up.clamp_(0.0, 1.0).numpy().astype(np.float32)
    return maps


def plot_attention(config: str, weights, output: str, *, images=None, dataset_json: str | None = None,
                   image_root: str | None = None, num_images: int = 2, levels: Sequence[str] | None = None,
                   opts: Sequence[str] = (), reduction: str = "l2", alpha: float = 0.5) -> PlotResult:
    """Feature-magnitude heat maps of one or more checkpoints on the same images.

    Rows are images; columns are the image, then for each checkpoint each level (FPN p2..p5, or
    ResNet res2..res5 for a ResNet-only model such as DetCo / MoCo v2; `levels` overrides).
    `weights`: {label: path}, (label, path) pairs or 'LABEL=PATH' strings.
    data["maps"][label][level] is the list of per-image (H, W) maps in [0, 1].
    """
    cfg = _build_cfg(config, opts)
    pairs = _labeled(weights, "--weights")
    paths = _image_paths(images, dataset_json, image_root, num_images)
    inputs = [_model_input(cfg, p) for p in paths]

    maps, reports, chosen = {}, {}, None
    for label, wpath in pairs:
        model = _build_model(cfg)
        backbone, prefix = _feature_backbone(model)
        available = list(backbone.output_shape())
        if chosen is None:
            chosen = list(levels) if levels else _default_levels(available)
            unknown = [lvl for lvl in chosen if lvl not in available]
            if unknown:
                raise ValueError(f"levels {unknown} are not outputs of the backbone of {config} "
                                 f"(available: {available})")
        reports[label] = _load_weights(model, wpath, label, required_prefix=prefix)
        maps[label] = {lvl: [] for lvl in chosen}
        for shown, tensor in inputs:
            per_level = feature_magnitude_maps(model, cfg, tensor, shown.shape[:2], chosen, reduction)
            for lvl in chosen:
                maps[label][lvl].append(per_level[lvl])
        del model

    n_cols = 1 + len(pairs) * len(chosen)
    aspect = inputs[0][0].shape[0] / inputs[0][0].shape[1]
    fig = _new_figure(1.9 * n_cols + 0.8, max(1.6, 1.9 * aspect) * len(paths) + 0.6)
    axes = np.array(fig.subplots(len(paths), n_cols, squeeze=False))
    mappable = None
    for i, (path, (shown, _)) in enumerate(zip(paths, inputs)):
        axes[i, 0].imshow(shown)
        axes[i, 0].set_ylabel(os.path.basename(path), fontsize=7)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        col = 1
        for label, _ in pairs:
            for lvl in chosen:
                ax = axes[i, col]
                ax.imshow(shown)
                mappable = ax.imshow(maps[label][lvl][i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
                if i == 0:
                    ax.set_title(f"{label}\n{lvl}", fontsize=8)
                col += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(mappable, ax=axes, shrink=0.8, fraction=0.02, label="feature magnitude (min-max)")
    fig.suptitle(f"Feature magnitude ({'L2 norm' if reduction == 'l2' else 'mean |x|'} over channels, "
                 f"min-max per map) - {os.path.basename(config)}", fontsize=9)
    data = {"images": paths, "labels": [lb for lb, _ in pairs], "levels": chosen, "reduction": reduction,
            "maps": maps, "weights": reports}
    return PlotResult(_save_png(fig, output), data)


# ---------------------------------------------------------------------------------------------
# 5. predictions
# ---------------------------------------------------------------------------------------------
def _class_names(cfg, dataset_json: str | None) -> tuple[list[str], str]:
    """Category names for the Visualizer and where they came from (json, catalog or generic)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.datasets import read_json_file

    num = cfg.MODEL.ROI_HEADS.NUM_CLASSES

    def from_json(path):
        cats = read_json_file(path).get("categories") or []
        return [str(c.get("name", c.get("id"))) for c in sorted(cats, key=lambda c: c["id"])]

    if dataset_json:
        names = from_json(dataset_json)
        if len(names) == num:
            return names, dataset_json
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name in DatasetCatalog.list():
            names = MetadataCatalog.get(name).get("thing_classes", None)
            if names and len(names) == num:
                return list(names), f"MetadataCatalog[{name!r}]"
    for entry in cfg.DATASETS.LVIS_CUSTOM:  # config-registered datasets, read without registering
        if len(entry) == 3 and entry[0] in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN) \
                and os.path.isfile(entry[1]):
            try:
                names = from_json(entry[1])
            except (ValueError, OSError, AttributeError, KeyError):
                continue
            if len(names) == num:
                return names, entry[1]
    return [f"class {i}" for i in range(num)], "generic"


def plot_predictions(config: str, weights, output: str, *, images=None, dataset_json: str | None = None,
                     image_root: str | None = None, num_images: int = 2, score_thresh: float = 0.3,
                     opts: Sequence[str] = ()) -> PlotResult:
    """Predicted boxes and masks (score >= score_thresh) drawn by detectron2's Visualizer.

    Rows are images, columns checkpoints. `weights`: a path, {label: path}, pairs or 'LABEL=PATH'.
    data["instances"][label] lists per image {"boxes" (n, 4) XYXY, "scores", "classes"}.
    """
    import torch
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import Visualizer

    cfg = _build_cfg(config, opts)
    # The model drops low scores itself (cheaper mask pasting), as detectron2's demo does.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_thresh)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = float(score_thresh)
    pairs = _labeled(weights, "--weights")
    paths = _image_paths(images, dataset_json, image_root, num_images)
    names, names_source = _class_names(cfg, dataset_json)
    metadata = Metadata(name="drcl_plots").set(thing_classes=names)

    instances, drawn, reports = {}, {}, {}
    for label, wpath in pairs:
        model = _build_model(cfg)
        if hasattr(model, "online_network"):
            raise ValueError(f"{config}: META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} is a pretraining "
                             "model; predictions need a detector config (e.g. GeneralizedRCNN)")
        report = _load_weights(model, wpath, label)
        if report["incorrect_shapes"]:
            k, (c, m) = next(iter(report["incorrect_shapes"].items()))
            raise ValueError(f"weights {label!r} ({wpath}): {len(report['incorrect_shapes'])} tensors differ in "
                             f"shape from the config's model, e.g. {k} {c} vs {m} (set "
                             "MODEL.ROI_HEADS.NUM_CLASSES to the checkpoint's with --opts)")
        untrained = [k for k in report["missing"] if ".box_predictor." in k]
        if untrained:
            raise ValueError(f"weights {label!r} ({wpath}) has no trained box predictor ({untrained[0]} "
                             "missing): predictions need a fine-tuned detector, not a pretraining checkpoint")
        reports[label] = report
        instances[label], drawn[label] = [], []
        for path in paths:
            shown, tensor = _model_input(cfg, path)
            h, w = shown.shape[:2]
            with torch.no_grad():
                out = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
            out = out[out.scores >= score_thresh]
            instances[label].append({
                "boxes": out.pred_boxes.tensor.numpy() if out.has("pred_boxes") else np.zeros((0, 4)),
                "scores": out.scores.numpy(),
                "classes": out.pred_classes.numpy(),
            })
            scale = float(np.clip(640 / max(h, w), 0.5, 4.0))  # readable labels on tiny and huge images
            drawn[label].append(Visualizer(shown, metadata, scale=scale).draw_instance_predictions(out).get_image())
        del model

    first = drawn[pairs[0][0]][0]
    aspect = min(1.5, first.shape[0] / first.shape[1])
    fig = _new_figure(max(6.0, 4.2 * len(pairs) + 0.4), 4.2 * aspect * len(paths) + 0.8)
    axes = np.array(fig.subplots(len(paths), len(pairs), squeeze=False))
    for j, (label, _) in enumerate(pairs):
        for i, path in enumerate(paths):
            ax = axes[i, j]
            ax.imshow(drawn[label][i])
            ax.set_title(f"{label}: {len(instances[label][i]['scores'])} detections", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(os.path.basename(path), fontsize=7)
    fig.suptitle(f"Predictions with score >= {score_thresh:g}\n{os.path.basename(config)}; class names: "
                 f"{os.path.basename(names_source)}", fontsize=9)
    data = {"images": paths, "labels": [lb for lb, _ in pairs], "score_thresh": float(score_thresh),
            "instances": instances, "class_names": names, "class_names_source": names_source,
            "weights": reports}
    return PlotResult(_save_png(fig, output), data)


# ---------------------------------------------------------------------------------------------
# the demo's figures
# ---------------------------------------------------------------------------------------------
def _has_drb(metrics_json: str) -> bool:
    """Whether a metrics.json logs drb/*; True on a malformed file, so the plot reports the problem."""
    try:
        return any(any(k in r for k in DRB_KEYS) for _, r in _metrics_records(metrics_json))
    except (ValueError, OSError):
        return True


def make_demo_figures(dataset_json: str, image_root: str, finetune_dir: str, out_dir: str, config: str,
                      weights: Mapping[str, str], pretrain_dir: str | None = None, *,
                      val_json: str | None = None, opts: Sequence[str] = (), num_images: int = 2) -> dict:
    """Every figure whose inputs exist, into `out_dir`; returns {figure name: PNG path}.

    dataset_json: the training json (long tail; images too unless `val_json`). finetune_dir /
    pretrain_dir: run folders (metrics.json, model_final.pth). config + opts: the fine-tuning
    config (also gives t = DATALOADER.REPEAT_THRESHOLD). weights: {label: checkpoint} for the
    attention maps. A figure whose inputs are absent, or that fails, is skipped with a log line
    saying why: figures must never stop the demo.
    """
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}

    def attempt(name, needs: Iterable[tuple[bool, str]], make):
        for ok, why in needs:
            if not ok:
                logger.info(f"figure {name}: skipped ({why})")
                return
        try:
            written[name] = make(os.path.join(out_dir, f"{name}.png")).path
        except Exception as e:  # noqa: BLE001  (a figure is a by-product; report and go on)
            logger.warning(f"figure {name}: skipped ({type(e).__name__}: {e})")

    try:
        cfg = _build_cfg(config, opts)
        thresh, inst_freq = cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.DRB.INSTANCE_FREQUENCY
    except (ValueError, OSError) as e:
        logger.warning(f"figures: config {config} unusable ({e}); long tail with t = 0.1")
        cfg, thresh, inst_freq = None, 0.1, "fraction_of_instances"
    json_ok = (bool(dataset_json) and os.path.isfile(dataset_json), f"no dataset json {dataset_json}")
    attempt("longtail", [json_ok], lambda out: plot_longtail(dataset_json, out, image_root, thresh,
                                                             instance_frequency=inst_freq))

    for run_name, run_dir in (("finetune", finetune_dir), ("pretrain", pretrain_dir)):
        metrics = os.path.join(run_dir, "metrics.json") if run_dir else ""
        exists = (bool(metrics) and os.path.isfile(metrics), f"no {run_name} metrics.json in {run_dir}")
        name = "drb_schedule" if run_name == "finetune" else "drb_schedule_pretrain"
        attempt(name, [exists, (exists[0] and _has_drb(metrics), f"{metrics} has no drb/* values "
                                "(not a DynamicRepeatFactorTrainingSampler run)")],
                lambda out, m=metrics: plot_drb_schedule(m, out))

    ft_metrics = os.path.join(finetune_dir, "metrics.json") if finetune_dir else ""
    attempt("ap_groups", [(bool(ft_metrics) and os.path.isfile(ft_metrics), f"no metrics.json in {finetune_dir}")],
            lambda out: plot_ap_groups({os.path.basename(os.path.normpath(finetune_dir)): ft_metrics}, out))

    img_json = val_json or dataset_json
    img_ok = (bool(img_json) and os.path.isfile(img_json), f"no image json {img_json}")
    present = {k: v for k, v in (weights or {}).items() if v and os.path.isfile(v)}
    for k, v in (weights or {}).items():
        if k not in present:
            logger.info(f"figure attention: weights {k!r} left out ({v} not found)")
    attempt("attention", [(cfg is not None, "config unusable"), img_ok, (bool(present), "no weights file exists")],
            lambda out: plot_attention(config, present, out, dataset_json=img_json, image_root=image_root,
                                       num_images=num_images, opts=opts))

    final = os.path.join(finetune_dir, "model_final.pth") if finetune_dir else ""
    attempt("predictions", [(cfg is not None, "config unusable"), img_ok,
                            (bool(final) and os.path.isfile(final), f"no fine-tuned model {final}")],
            lambda out: plot_predictions(config, {"fine-tuned": final}, out, dataset_json=img_json,
                                         image_root=image_root, num_images=num_images, opts=opts))
    return written


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drcl_d2.tools.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    s = sub.add_parser("longtail", help="images per category (r/c/f) and DRB repeat factors")
    s.add_argument("json", metavar="TRAIN_JSON", help="LVIS-format training json")
    s.add_argument("--image-root", default=None, help="image folder (only paths are used; default: the json's folder)")
    s.add_argument("--repeat-thresh", type=float, default=0.1, help="t of r_c = max(1, sqrt(t/f_c)) (default 0.1, "
                   "configs/embedded; LVIS uses 0.001)")
    s.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="α_d values to draw")
    s.add_argument("--instance-frequency", default="fraction_of_instances",
                   choices=["fraction_of_instances", "instances_per_image"], help="DATALOADER.DRB.INSTANCE_FREQUENCY")
    s.add_argument("--output", default="longtail.png")

    s = sub.add_parser("drb-schedule", help="α_d and epoch length over a DRB run")
    s.add_argument("metrics", metavar="RUN_OR_METRICS_JSON", help="run folder or its metrics.json")
    s.add_argument("--output", default="drb_schedule.png")

    s = sub.add_parser("ap-groups", help="AP / APr / APc / APf of several runs")
    s.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                   help="run folder or metrics.json, repeatable")
    s.add_argument("--output", default="ap_groups.png")

    for name, helptext in (("attention", "feature-magnitude maps per FPN level / ResNet stage"),
                           ("predictions", "predicted boxes and masks (detectron2 Visualizer)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", required=True, help="detectron2 config of the model")
        s.add_argument("--weights", action="append", required=True, metavar="LABEL=PATH",
                       help="checkpoint (.pth / .pkl), repeatable")
        s.add_argument("--images", nargs="+", default=None, metavar="IMAGE")
        s.add_argument("--dataset-json", default=None, help="take the first --num-images images of this json")
        s.add_argument("--image-root", default=None)
        s.add_argument("--num-images", type=int, default=2)
        if name == "attention":
            s.add_argument("--levels", nargs="+", default=None, help="default p2..p5 (FPN) or res2..res5")
            s.add_argument("--reduction", choices=["l2", "mean_abs"], default="l2")
        else:
            s.add_argument("--score-thresh", type=float, default=0.3)
        s.add_argument("--output", default=f"{name}.png")
        s.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                       help="config overrides (last on the command line)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; bad input -> message on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "longtail":
            res = plot_longtail(args.json, args.output, args.image_root, args.repeat_thresh, args.alphas,
                                args.instance_frequency)
        elif args.command == "drb-schedule":
            res = plot_drb_schedule(args.metrics, args.output)
        elif args.command == "ap-groups":
            res = plot_ap_groups(args.run, args.output)
        elif args.command == "attention":
            res = plot_attention(args.config, args.weights, args.output, images=args.images,
                                 dataset_json=args.dataset_json, image_root=args.image_root,
                                 num_images=args.num_images, levels=args.levels, opts=args.opts,
                                 reduction=args.reduction)
        else:
            res = plot_predictions(args.config, args.weights, args.output, images=args.images,
                                   dataset_json=args.dataset_json, image_root=args.image_root,
                                   num_images=args.num_images, score_thresh=args.score_thresh, opts=args.opts)
    except (ValueError, OSError) as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2
    print(res.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
