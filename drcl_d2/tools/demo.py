"""`make demo`: the main job end to end on the embedded long-tailed dataset (CPU, no downloads).

    python -m drcl_d2.tools.demo [--data datasets/embedded_small] [--output output/demo]
                                 [--pretrain-iters N] [--iters N] [--no-pretrain]

Steps, each the command a user would type (printed before it runs):
1. generate (or reuse) the embedded LVIS-format long-tailed dataset;
2. 2DRCL pretraining of the whole detector with Dynamic Rebalancing (pretrain_net.py);
3. drcl-convert: pretraining checkpoint -> detectron2 Mask R-CNN weights;
4. fine-tuning with Dynamic Rebalancing and LVIS evaluation (train_net.py);
5. figures under OUTPUT/figures (long tail and DRB factors, DRB schedule, AP by frequency group,
   attention maps, predictions);
6. the AP / APr / APc / APf table (bbox, segm), also written to OUTPUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tabulate import tabulate

from ..data.synthetic import PRESETS
from ..utils import load_config
from . import plots, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf")


def make_demo_figures(dataset_json: str, image_root: str, finetune_dir: str, out_dir: str, config: str,
                      weights: dict, pretrain_dir: str | None = None, *, val_json: str | None = None,
                      opts: list[str] = (), num_images: int = 2) -> dict:
    """The demo's figures in ``out_dir`` ({figure name: PNG path}): the long tail of ``dataset_json`` with
    the fine-tuning config's DRB settings, attention maps of ``weights`` ({label: checkpoint}) and
    predictions on ``val_json`` (else ``dataset_json``) images. A figure that fails, or lacks its inputs,
    is skipped with a line saying why: figures never stop the demo."""

    def longtail(out):
        cfg = load_config(config, opts, device="cpu")
        return plots.plot_longtail(dataset_json, out, image_root, cfg.DATALOADER.REPEAT_THRESHOLD,
                                   instance_frequency=cfg.DATALOADER.DRB.INSTANCE_FREQUENCY)

    present = {label: path for label, path in weights.items() if os.path.isfile(path)}
    for label in sorted(set(weights) - set(present)):
        print(f"figure attention: weights {label!r} left out ({weights[label]} not found)")
    images = dict(dataset_json=val_json or dataset_json, image_root=image_root, num_images=num_images, opts=opts)
    figures = {
        "longtail": longtail,
        "drb_schedule": lambda out: plots.plot_drb_schedule(finetune_dir, out),
        "ap_groups": lambda out: plots.plot_ap_groups({os.path.basename(os.path.normpath(finetune_dir)): finetune_dir}, out),
        "attention": lambda out: visualize.plot_attention(config, present, out, **images),
        "predictions": lambda out: visualize.plot_predictions(
            config, {"fine-tuned": os.path.join(finetune_dir, "model_final.pth")}, out, **images),
    }
    if pretrain_dir:  # a pretraining run with Dynamic Rebalancing logs its schedule too
        figures["drb_schedule_pretrain"] = lambda out: plots.plot_drb_schedule(pretrain_dir, out)
    written = {}
    for name, make in figures.items():
        try:
            written[name] = make(os.path.join(out_dir, f"{name}.png")).path
        except Exception as e:  # noqa: BLE001 - a figure is a by-product: say why and go on
            print(f"figure {name}: skipped ({type(e).__name__}: {e})")
    return written


def short_schedule(iters: int | None) -> list[str]:
    """Config overrides for a shorter run (tests, the long-tail table): MAX_ITER, one LR step at 75 %,
    at most 20 warm-up iterations, a checkpoint only at the end. None: the config's own schedule."""
    if iters is None:
        return []
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({max(1, int(iters * 0.75))},)",
            "SOLVER.WARMUP_ITERS", str(min(20, iters)), "SOLVER.CHECKPOINT_PERIOD", str(iters)]


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="datasets/embedded_small", help="where the embedded dataset lives")
    parser.add_argument("--preset", default="small", help="embedded dataset size (tiny|small|medium)")
    parser.add_argument("--output", default="output/demo", help="everything the demo writes goes here")
    parser.add_argument("--config", default="configs/embedded/mask_rcnn_R_18_FPN_drb.yaml")
    parser.add_argument("--pretrain-config", default="configs/embedded/drcl_R_18_FPN_embedded.yaml")
    parser.add_argument("--no-pretrain", action="store_true", help="fine-tune from scratch (no 2DRCL stage)")
    parser.add_argument("--pretrain-iters", type=int, default=None, help="override the pretraining SOLVER.MAX_ITER")
    parser.add_argument("--iters", type=int, default=None, help="override the fine-tuning SOLVER.MAX_ITER")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for train_net.py")
    args = parser.parse_args(argv)
    start = time.time()
    py = sys.executable

    run([py, "-m", "drcl_d2.data.synthetic", args.data, "--preset", args.preset])
    data = os.path.abspath(os.path.join(ROOT, args.data))
    datasets = [["embedded_train", f"{data}/lvis_v1_train.json", data],
                ["embedded_val", f"{data}/lvis_v1_val.json", data]]
    common = ["DATASETS.LVIS_CUSTOM", repr(datasets),
              "MODEL.ROI_HEADS.NUM_CLASSES", str(PRESETS[args.preset]["num_categories"])]
    extra = list(args.opts or [])
    weights = []
    if not args.no_pretrain:
        pre_out = os.path.join(args.output, "pretrain")
        run([py, "pretrain_net.py", "--config-file", args.pretrain_config, "OUTPUT_DIR", pre_out]
            + common + short_schedule(args.pretrain_iters) + extra)
        converted = os.path.join(args.output, "drcl_converted.pkl")
        run([py, "-m", "drcl_d2.checkpoint", os.path.join(pre_out, "model_final.pth"), converted,
             "--target-config", args.config, "--opts"] + common + extra)
        weights = ["MODEL.WEIGHTS", converted]
    run([py, "train_net.py", "--config-file", args.config, "OUTPUT_DIR", os.path.join(args.output, "finetune")]
        + common + weights + short_schedule(args.iters) + extra)

    print("\n# figures (python -m drcl_d2.tools.plots ... makes each on your own runs)", flush=True)
    out = os.path.join(ROOT, args.output)
    checkpoints = {"2DRCL pretrained": weights[1]} if weights else {}
    checkpoints["fine-tuned"] = os.path.join(out, "finetune", "model_final.pth")
    figures = make_demo_figures(
        f"{data}/lvis_v1_train.json", data, os.path.join(out, "finetune"), os.path.join(out, "figures"),
        os.path.join(ROOT, args.config), checkpoints, None if args.no_pretrain else os.path.join(out, "pretrain"),
        val_json=f"{data}/lvis_v1_val.json", opts=common + extra)
    results = plots.read_final_metrics(os.path.join(out, "finetune", "metrics.json"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nLVIS evaluation on the embedded val split ({args.config}):\n")
    rows = [[task] + [f"{results[task].get(m, float('nan')):.1f}" for m in METRICS] for task in sorted(results)]
    print(tabulate(rows, headers=["task"] + list(METRICS), tablefmt="github"))
    if figures:
        print("\nFigures:\n" + "\n".join(f"  {name}: {path}" for name, path in figures.items()))
    print(f"\nEverything is under {args.output}/ (took {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
