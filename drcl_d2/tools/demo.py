"""`make demo`: the main job end to end on the embedded long-tailed dataset (CPU, no downloads).

    python -m drcl_d2.tools.demo [--data datasets/embedded_small] [--output output/demo] [--iters N]

Steps: generate (or reuse) the embedded LVIS-format dataset -> fine-tune Mask R-CNN with Dynamic
Rebalancing through train_net.py -> LVIS evaluation -> print AP / APr / APc / APf (bbox, segm).
Each step is the command a user would type; they are printed before they run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf")


def read_final_metrics(metrics_json: str) -> dict:
    """The last evaluation in a detectron2 metrics.json: {"bbox": {AP: ..}, "segm": {..}}."""
    if not os.path.isfile(metrics_json):
        raise FileNotFoundError(f"{metrics_json} not found: did training run?")
    results = {}
    with open(metrics_json) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_json}:{line_no} is not a JSON line: {e}") from e
            for key, value in record.items():
                task, _, metric = key.partition("/")
                if task in ("bbox", "segm") and metric:
                    results.setdefault(task, {})[metric] = value
    if not results:
        raise ValueError(f"{metrics_json} holds no bbox/segm evaluation results")
    return results


def format_results_table(results: dict) -> str:
    from tabulate import tabulate

    rows = [[task] + [f"{results[task].get(m, float('nan')):.1f}" for m in METRICS] for task in sorted(results)]
    return tabulate(rows, headers=["task"] + list(METRICS), tablefmt="github")


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="datasets/embedded_small", help="where the embedded dataset lives")
    parser.add_argument("--preset", default="small", help="embedded dataset size (tiny|small|medium)")
    parser.add_argument("--output", default="output/demo", help="everything the demo writes goes here")
    parser.add_argument("--config", default="configs/embedded/mask_rcnn_R_18_FPN_drb.yaml")
    parser.add_argument("--iters", type=int, default=None, help="override SOLVER.MAX_ITER (tests use a few)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for train_net.py")
    args = parser.parse_args(argv)
    start = time.time()
    py = sys.executable

    run([py, "-m", "drcl_d2.data.synthetic", args.data, "--preset", args.preset])
    data = os.path.abspath(os.path.join(ROOT, args.data))
    datasets = [["embedded_train", f"{data}/lvis_v1_train.json", data],
                ["embedded_val", f"{data}/lvis_v1_val.json", data]]
    from drcl_d2.data.synthetic import PRESETS

    opts = ["OUTPUT_DIR", os.path.join(args.output, "finetune"), "DATASETS.LVIS_CUSTOM", repr(datasets),
            "MODEL.ROI_HEADS.NUM_CLASSES", str(PRESETS[args.preset]["num_categories"])]
    if args.iters is not None:
        steps = f"({int(args.iters * 0.75)},)"
        opts += ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", steps,
                 "SOLVER.WARMUP_ITERS", str(min(50, args.iters)), "SOLVER.CHECKPOINT_PERIOD", str(args.iters)]
    run([py, "train_net.py", "--config-file", args.config] + opts + list(args.opts or []))

    results = read_final_metrics(os.path.join(ROOT, args.output, "finetune", "metrics.json"))
    with open(os.path.join(ROOT, args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nLVIS evaluation on the embedded val split ({args.config}):\n")
    print(format_results_table(results))
    print(f"\nEverything is under {args.output}/ (took {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
