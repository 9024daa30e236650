"""PNG figures of a dataset's long tail and of drcl_d2 runs (matplotlib, Agg; no display needed).

    python -m drcl_d2.tools.plots longtail TRAIN_JSON [--image-root R] [--repeat-thresh 0.1] --output longtail.png
    python -m drcl_d2.tools.plots drb-schedule RUN_DIR_OR_METRICS_JSON --output drb.png
    python -m drcl_d2.tools.plots ap-groups --run RFS=output/rfs --run DRB=output/drb --output ap.png
    python -m drcl_d2.tools.plots attention --config CFG.yaml --weights init=a.pth --weights 2DRCL=b.pkl \\
        (--images IMG [IMG ...] | --dataset-json J --image-root R --num-images N) --output attn.png [--opts K V ...]
    python -m drcl_d2.tools.plots predictions --config CFG.yaml --weights model_final.pth \\
        (--images ... | --dataset-json ...) [--score-thresh 0.3] --output pred.png [--opts K V ...]

From json files: ``longtail`` (training images per category by LVIS frequency group, and the Dynamic
Rebalancing factors r_c at several α_d; α_d = 0 is detectron2's RFS), ``drb-schedule`` (the ``drb/*``
scalars of a DRB run's metrics.json), ``ap-groups`` (the last AP / APr / APc / APf of several runs;
LVIS's -100 for a group without detections is a hatched 0 marked "x"). ``attention`` and
``predictions`` run models (:mod:`drcl_d2.tools.visualize`). Each PNG is written atomically; each
function returns a :class:`PlotResult` ``(path, data)``. Bad inputs raise FileNotFoundError /
ValueError naming the file (and line or key); the command prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from ..data.datasets import FREQUENCIES as GROUPS, _read_json, load_lvis_format_json, sorted_categories
from ..data.rebalance import CategoryStatistics, DynamicRepeatFactors
from ..utils import COMMON_MAX_IMAGES, RARE_MAX_IMAGES, atomic_write, frequency_group

logger = logging.getLogger(__name__)

__all__ = ["PlotResult", "plot_longtail", "plot_drb_schedule", "plot_ap_groups", "read_final_metrics", "main"]

GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
AP_METRICS = ("AP", "APr", "APc", "APf")
DRB_KEYS = {"drb/alpha": "alpha", "drb/epoch_length": "epoch_length", "drb/mean_repeat": "mean_repeat"}


class PlotResult(NamedTuple):
    """What every plot function returns: the PNG written and the numbers it shows."""

    path: str
    data: dict


def new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend state, nothing to close, safe in threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, output: str, data: dict) -> PlotResult:
    """``fig`` as a PNG at ``output``, written atomically (no clipped labels)."""
    output = os.fspath(output)
    atomic_write(output, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1))
    logger.info(f"Wrote {output}")
    return PlotResult(output, data)


def labeled_paths(items, what: str) -> list[tuple[str, str]]:
    """A path, {label: path}, (label, path) pairs or 'LABEL=PATH' strings -> distinct (label, path) pairs;
    a bare path is labelled by its file or folder name (a run folder for its metrics.json)."""

    def parse(spec: str) -> tuple[str, str]:
        if "=" in spec and not os.path.exists(spec):
            label, path = spec.split("=", 1)
            if not label or not path:
                raise ValueError(f"{what} {spec!r}: expected LABEL=PATH")
            return label, path
        name = os.path.basename(os.path.normpath(spec))
        if name == "metrics.json":
            name = os.path.basename(os.path.dirname(os.path.abspath(spec)))
        return os.path.splitext(name)[0] or spec, spec

    if isinstance(items, (str, os.PathLike)):
        items = [os.fspath(items)]
    pairs = list(items.items()) if isinstance(items, Mapping) else [parse(i) if isinstance(i, str) else tuple(i) for i in items]
    labels = [label for label, _ in pairs]
    if not pairs or len(set(labels)) < len(labels):
        raise ValueError(f"{what}: give LABEL=PATH at least once, with distinct labels (got {labels})")
    return [(str(label), os.fspath(path)) for label, path in pairs]


def _metrics_records(path: str) -> Iterator[tuple[str, int, dict]]:
    """(file, line number, record) of a detectron2 metrics.json (one JSON object per line) or run folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, path = path, os.path.join(path, "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: run folder without metrics.json (did training start?)")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not a JSON line: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no} is not a JSON object (found {type(record).__name__})")
            yield path, line_no, record


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, found {value!r}")
    return float(value)


def read_final_metrics(metrics_json: str) -> dict:
    """The last evaluation in a detectron2 metrics.json (or run folder): {"bbox": {AP: ..}, "segm": {..}}."""
    results = {}
    for _, _, record in _metrics_records(metrics_json):
        for key, value in record.items():
            task, _, metric = key.partition("/")
            if task in ("bbox", "segm") and metric:
                results.setdefault(task, {})[metric] = value
    if not results:
        raise ValueError(f"{metrics_json} holds no bbox/segm evaluation results")
    return results


def plot_longtail(train_json: str, output: str, image_root: str | None = None, repeat_thresh: float = 0.1,
                  alphas: Sequence[float] = (0.0, 0.5, 1.0), instance_frequency: str = "fraction_of_instances") -> PlotResult:
    """Images per category (log scale, r/c/f colours) and DRB's r_c at several α_d, categories sorted by
    training images (descending). Counts come from the annotations as the training loader sees them
    (images without annotations dropped, as FILTER_EMPTY_ANNOTATIONS): r_c are the factors DRB / RFS use.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    raw = _read_json(train_json)  # errors name the file and what is missing, as the loader's
    if any(not isinstance(c, dict) or "id" not in c for c in raw["categories"]):
        raise ValueError(f"{train_json}: a category entry has no 'id'")
    categories = sorted_categories(raw, train_json)  # the loader's contiguous order
    del raw  # LVIS train is ~1 GB of json: do not hold two copies
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(train_json))
    dicts = [d for d in load_lvis_format_json(train_json, root, check_files=False) if d["annotations"]]
    if not dicts:
        raise ValueError(f"{train_json}: no image has an annotation, so there is no long tail to plot")
    stats = CategoryStatistics.from_dataset_dicts(dicts)
    drb = DynamicRepeatFactors(stats, repeat_thresh, instance_frequency)

    image_counts, instance_counts = np.zeros((2, len(categories)), dtype=np.int64)
    image_counts[stats.category_ids] = stats.image_counts  # stats ids are contiguous 0..C-1
    instance_counts[stats.category_ids] = stats.instance_counts
    factors = {float(a): np.ones(len(categories)) for a in alphas}  # 1 for a category without training images
    for a, r in factors.items():
        r[stats.category_ids] = drb.category_factors(a)
    in_json = [c.get("frequency") in GROUPS for c in categories]
    frequency = [c["frequency"] if ok else frequency_group(int(n)) for c, ok, n in zip(categories, in_json, image_counts)]
    order = np.lexsort((np.array([c["id"] for c in categories]), -image_counts))  # ties by id: deterministic
    data = {"json": train_json, "num_images": stats.num_images, "num_instances": stats.num_instances,
            "repeat_thresh": float(repeat_thresh), "instance_frequency": instance_frequency,
            "category_ids": [categories[i]["id"] for i in order],
            "names": [str(categories[i].get("name", categories[i]["id"])) for i in order],
            "image_counts": image_counts[order], "instance_counts": instance_counts[order],
            "frequency": [frequency[i] for i in order],
            "frequency_source": "json" if all(in_json) else "computed" if not any(in_json) else "json+computed",
            "band_counts": {g: frequency.count(g) for g in GROUPS},
            "repeat_factors": {a: r[order] for a, r in factors.items()}}

    counts = data["image_counts"]
    x = np.arange(len(counts))
    fig = new_figure(max(7.0, 0.12 * len(x) + 3), 7.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    # A category without training images has no bar on a log axis.
    ax1.bar(x, np.where(counts > 0, counts, np.nan), width=1.0, color=[GROUP_COLORS[f] for f in data["frequency"]])
    ax1.set(yscale="log", ylabel="training images per category")
    for t in (RARE_MAX_IMAGES, COMMON_MAX_IMAGES):
        ax1.axhline(t, color="grey", lw=0.8, ls="--")
    handles = [Patch(color=GROUP_COLORS[g], label=f"{GROUP_NAMES[g]} ({data['band_counts'][g]})") for g in GROUPS]
    handles.append(Line2D([], [], color="grey", lw=0.8, ls="--", label=f"{RARE_MAX_IMAGES} / {COMMON_MAX_IMAGES} images"))
    ax1.legend(handles=handles, title=f"group (from {data['frequency_source']})", fontsize=8, title_fontsize=8)
    ax1.set_title(f"Long tail of {os.path.basename(train_json)}: {len(x)} categories, "
                  f"{data['num_images']} images, {data['num_instances']} instances")
    for (a, r), style in zip(data["repeat_factors"].items(), ("-", "--", ":", "-.")):
        ax2.plot(x, r, ls=style, marker="o", ms=3, label=f"α_d = {a:g}" + (" (= RFS)" if a == 0 else ""))
    ax2.set(ylabel="repeat factor r_c", xlabel="categories, sorted by training images")
    ax2.set_title(f"Dynamic Rebalancing r_c = max(1, sqrt(t / f_c)), t = {data['repeat_thresh']:g}, "
                  f"f_in: {data['instance_frequency']}", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if len(x) <= 40:  # names stay readable up to about LVIS-subset size
        ax2.set_xticks(x, data["names"], rotation=90, fontsize=7)
    return save_png(fig, output, data)


def plot_drb_schedule(metrics: str, output: str) -> PlotResult:
    """α_d (top) and epoch length Σ r_I with mean r_I (bottom) per logged iteration of one run (a resumed
    run's later lines win)."""
    by_iter: dict[int, dict] = {}
    metrics_json = metrics
    for metrics_json, line_no, record in _metrics_records(metrics):
        values = {name: record[key] for key, name in DRB_KEYS.items() if key in record}
        if not values:
            continue
        if "iteration" not in record:
            raise ValueError(f"{metrics_json}:{line_no} has drb/* values but no 'iteration'")
        entry = by_iter.setdefault(int(_number(record["iteration"], f"{metrics_json}:{line_no} 'iteration'")), {})
        entry.update({name: _number(v, f"{metrics_json}:{line_no} 'drb/{name}'") for name, v in values.items()})
    if not by_iter:
        raise ValueError(f"{metrics_json} holds no drb/* values (drb/alpha, drb/epoch_length, drb/mean_repeat): "
                         "was the run trained with DynamicRepeatFactorTrainingSampler?")
    it = np.array(sorted(by_iter), dtype=np.int64)
    data = {"metrics_json": metrics_json, "iteration": it,
            **{name: np.array([by_iter[i].get(name, np.nan) for i in it.tolist()]) for name in DRB_KEYS.values()}}

    fig = new_figure(7.0, 5.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    # Factors are constant within a DRB period: the logged values are drawn as steps.
    ax1.plot(it, data["alpha"], drawstyle="steps-post", marker=".", color="tab:purple")
    ax1.set(ylim=(-0.05, 1.05), ylabel="α_d = T / T_max")
    ax1.set_title(f"Dynamic Rebalancing schedule ({metrics_json})", fontsize=10)
    ax2.plot(it, data["epoch_length"], drawstyle="steps-post", marker=".", color="tab:green")
    ax2.set_ylabel("epoch length Σ r_I (images)", color="tab:green")
    ax2.set_xlabel("iteration")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if np.isfinite(data["mean_repeat"]).any():
        twin = ax2.twinx()
        twin.plot(it, data["mean_repeat"], drawstyle="steps-post", ls="--", color="tab:grey")
        twin.set_ylabel("mean r_I", color="tab:grey")
    return save_png(fig, output, data)


def plot_ap_groups(runs, output: str, metrics: Sequence[str] = AP_METRICS) -> PlotResult:
    """Grouped bars of the last bbox / segm AP / APr / APc / APf of each run, one panel per task;
    data["values"][task][label][metric] (NaN if absent).

    ``runs``: {label: run folder or metrics.json}, (label, path) pairs or 'LABEL=PATH' strings.
    """
    pairs = labeled_paths(runs, "--run")
    labels = [label for label, _ in pairs]
    finals = {label: read_final_metrics(path) for label, path in pairs}
    tasks = [t for t in ("bbox", "segm") if any(m in f.get(t, {}) for f in finals.values() for m in metrics)]
    if not tasks:
        raise ValueError(f"no bbox/* or segm/* values for {list(metrics)} in {[p for _, p in pairs]}")
    values = {t: {label: {m: _number(finals[label][t][m], f"{path} '{t}/{m}'") if m in finals[label].get(t, {})
                          else float("nan") for m in metrics} for label, path in pairs} for t in tasks}
    # LVIS writes -1 (x100) for a group where the model made no detection at all.
    no_det = [(t, label, m) for t in tasks for label in labels for m in metrics if values[t][label][m] < 0]
    data = {"labels": labels, "tasks": tasks, "metrics": list(metrics), "values": values, "no_detections": no_det}

    fig = new_figure(max(5.0, 1.2 + len(metrics) * (0.5 + 0.35 * len(labels))) * len(tasks), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(tasks), sharey=True))
    width, x = 0.8 / len(labels), np.arange(len(metrics))
    for ax, task in zip(axes, tasks):
        for j, label in enumerate(labels):
            vals = np.array([values[task][label][m] for m in metrics])
            pos = x - 0.4 + width * (j + 0.5)
            bars = ax.bar(pos, np.nan_to_num(np.where(vals < 0, 0.0, vals)), width, color=f"C{j % 10}", label=label)
            for bar, v, p in zip(bars, vals, pos):
                if np.isnan(v):
                    ax.text(p, 0.5, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                elif v < 0:
                    bar.set_hatch("//")
                    ax.plot([p], [0], marker="x", color="black", ms=7, zorder=3)
                else:
                    ax.text(p, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, metrics)
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AP (%)")
    axes[-1].legend(fontsize=8)
    if no_det:  # supxlabel, unlike fig.text, gets room from the constrained layout
        fig.supxlabel("x (hatched 0): LVIS reported -100, no detections in that group: "
                      + ", ".join(f"{lb} {t} {m}" for t, lb, m in no_det[:6]), fontsize=7)
    fig.suptitle("AP by LVIS frequency group (last evaluation of each run)", fontsize=10)
    return save_png(fig, output, data)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drcl_d2.tools.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    s = sub.add_parser("longtail", help="images per category (r/c/f) and DRB repeat factors")
    s.add_argument("json", metavar="TRAIN_JSON", help="LVIS-format training json")
    s.add_argument("--image-root", default=None, help="image folder (only paths are used; default: the json's folder)")
    s.add_argument("--repeat-thresh", type=float, default=0.1,
                   help="t of r_c = max(1, sqrt(t/f_c)) (default 0.1, configs/embedded; LVIS uses 0.001)")
    s.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="α_d values to draw")
    s.add_argument("--instance-frequency", default="fraction_of_instances",
                   choices=["fraction_of_instances", "instances_per_image"], help="DATALOADER.DRB.INSTANCE_FREQUENCY")
    s.add_argument("--output", default="longtail.png")
    s = sub.add_parser("drb-schedule", help="α_d and epoch length over a DRB run")
    s.add_argument("metrics", metavar="RUN_OR_METRICS_JSON", help="run folder or its metrics.json")
    s.add_argument("--output", default="drb_schedule.png")
    s = sub.add_parser("ap-groups", help="AP / APr / APc / APf of several runs")
    s.add_argument("--run", action="append", required=True, metavar="LABEL=PATH", help="run folder or metrics.json, repeatable")
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
        else:
            from . import visualize

            extra = (dict(levels=args.levels, reduction=args.reduction) if args.command == "attention"
                     else dict(score_thresh=args.score_thresh))
            res = getattr(visualize, f"plot_{args.command}")(
                args.config, args.weights, args.output, images=args.images, dataset_json=args.dataset_json,
                image_root=args.image_root, num_images=args.num_images, opts=args.opts, **extra)
    except (ValueError, OSError) as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2
    print(res.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
