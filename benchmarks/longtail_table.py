#!/usr/bin/env python
"""The long-tail results table: one fine-tuning schedule from different starts and samplers.

Starts: no pretraining, MoCo v2, DetCo, 2DRCL (each pretrained here on the same embedded set);
samplers: uniform (no pretraining only), RFS, Dynamic Rebalancing. Each cell is fine-tuned and
evaluated with LVISEvaluator for several seeds; the table reports mean ± std of bbox / segm AP, APr,
APc, APf, with the settings, wall time and commit. Every step is the project's own command line
(pretrain_net.py, drcl-convert, train_net.py); finished runs are reused, so an interrupted table
continues where it stopped.

    python benchmarks/longtail_table.py                 # medium embedded set, 3 seeds (about 90 min on 2 cores)
    python benchmarks/longtail_table.py --quick         # tiny set, 1 seed, a few iterations (checks the plumbing)
    python benchmarks/longtail_table.py --depth 50 --device cuda --size 512 --finetune-iters 1000 --jobs 1
                                                        # the R-50 scale on a GPU

Writes benchmarks/results/longtail_table.json and the "longtail" table of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import environment, update_benchmarks_md, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIGS = {
    "MoCo v2": "configs/embedded/moco_v2_R_18_embedded.yaml",
    "DetCo": "configs/embedded/detco_R_18_embedded.yaml",
    "2DRCL": "configs/embedded/drcl_R_18_FPN_embedded.yaml",
}
SAMPLER_CONFIGS = {
    "uniform": "configs/embedded/mask_rcnn_R_18_FPN_uniform.yaml",
    "RFS": "configs/embedded/mask_rcnn_R_18_FPN_rfs.yaml",
    "DRB": "configs/embedded/mask_rcnn_R_18_FPN_drb.yaml",
}
# "2DRCL backbone": the same 2DRCL pretraining converted with drcl-convert --backbone-only, so that
# the row beside "2DRCL + DRB" separates what the pretrained ResNet brings from what the transferred
# FPN / RPN / box head bring.
CELLS = [("none", "uniform"), ("none", "RFS"), ("none", "DRB")] + [
    (start, sampler) for start in PRETRAIN_CONFIGS for sampler in ("RFS", "DRB")
] + [("2DRCL backbone", "DRB")]
WALL_FILE = "wall_seconds.txt"  # written beside each finished run: the table adds them up
METRICS = ("AP", "APr", "APc", "APf")


def run(cmd: list[str], log: str, threads: int) -> float:
    """Runs one project command with its output in LOG; returns its wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    begin = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\nsee {log}")
    return time.time() - begin


def drop_checkpoints(run_dir: str, keep_final: bool) -> None:
    """Frees the disk a finished run no longer needs (the 33 runs write about 9 GB of checkpoints)."""
    for path in glob.glob(os.path.join(run_dir, "model_*.pth")):
        if not (keep_final and path.endswith("model_final.pth")):
            os.remove(path)


def run_all(jobs: list, workers: int, threads: int, what: str, keep: str) -> None:
    """Runs (name, [(cmd, log), ...]) jobs, WORKERS at a time, printing progress with an ETA.
    KEEP: "all" checkpoints, only the "final" one, or "none" once a run has finished."""
    if not jobs:
        return
    begin, done = time.time(), 0
    print(f"# {what}: {len(jobs)} runs, {workers} at a time, {threads} thread(s) each", flush=True)

    def one(job):
        name, steps = job
        seconds = sum(run(cmd, log, threads) for cmd, log in steps)
        wall_file = os.path.join(os.path.dirname(steps[0][1]), WALL_FILE)
        before = float(open(wall_file).read()) if os.path.exists(wall_file) else 0.0  # e.g. a later conversion
        with open(wall_file, "w") as f:
            f.write(f"{before + seconds:.1f}\n")
        if keep != "all":
            drop_checkpoints(os.path.dirname(wall_file), keep_final=keep == "final")
        return name, seconds

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(one, job) for job in jobs]):
            name, seconds = future.result()
            done += 1
            elapsed = time.time() - begin
            eta = elapsed / done * (len(jobs) - done)
            print(f"[{done}/{len(jobs)}] {name}: {seconds:.0f} s (elapsed {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/longtail")
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-iters", type=int, default=120)
    parser.add_argument("--finetune-iters", type=int, default=100)
    parser.add_argument("--size", type=int, default=160, help="short side of training / test images")
    parser.add_argument("--detections", type=int, default=50,
                        help="TEST.DETECTIONS_PER_IMAGE (the set has at most 6 objects per image)")
    parser.add_argument("--pretrain-per-seed", action="store_true",
                        help="pretrain once per seed (default: once, with seed 0, shared by the fine-tuning seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--depth", type=int, default=18, choices=(18, 50),
                        help="ResNet depth; 50 also widens FPN and heads to detectron2's R50-FPN sizes")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE of every run (cuda: the R-50 scale)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every checkpoint (default: only the final pretraining ones; results are in "
                             "each run's metrics.json)")
    parser.add_argument("--quick", action="store_true", help="tiny set, 1 seed, 3 iterations: checks the plumbing")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.seeds, args.pretrain_iters, args.finetune_iters, args.size = "tiny", [0], 2, 3, 128
        args.output = args.output.rstrip("/") + "_quick"

    from drcl_d2.data.synthetic import PRESETS, make_longtail_dataset
    from drcl_d2.tools.demo import short_schedule
    from drcl_d2.tools.plots import read_final_metrics

    py, start_time = sys.executable, time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    out = os.path.join(ROOT, args.output)
    data = os.path.join(out, f"data_{args.preset}")
    make_longtail_dataset(data, **PRESETS[args.preset])
    # Finished runs are reused only under the same settings: they live in a folder named by them.
    runs_root = os.path.join(out, f"{args.preset}_R{args.depth}_{args.size}px_pre{args.pretrain_iters}"
                                  f"_ft{args.finetune_iters}_det{args.detections}")
    datasets = repr([["lt_train", f"{data}/lvis_v1_train.json", data], ["lt_val", f"{data}/lvis_v1_val.json", data]])
    common = ["DATASETS.LVIS_CUSTOM", datasets, "DATASETS.TRAIN", "('lt_train',)",
              "MODEL.ROI_HEADS.NUM_CLASSES", str(PRESETS[args.preset]["num_categories"]),
              "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MIN_SIZE_TEST", str(args.size),
              "INPUT.MAX_SIZE_TRAIN", str(args.size * 5 // 4), "INPUT.MAX_SIZE_TEST", str(args.size * 5 // 4),
              "DATALOADER.NUM_WORKERS", "1", "MODEL.DEVICE", args.device]
    if args.depth == 50:  # detectron2's R50-FPN widths (the embedded configs narrow them for R-18)
        common += ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                   "MODEL.FPN.OUT_CHANNELS", "256", "MODEL.ROI_BOX_HEAD.FC_DIM", "1024",
                   "MODEL.ROI_MASK_HEAD.CONV_DIM", "256"]

    pretrain_seeds = args.seeds if args.pretrain_per_seed else [0]
    weights, pretrain_dirs, pretrain_jobs = {}, [], []
    for seed in pretrain_seeds:
        for method, config in PRETRAIN_CONFIGS.items():
            run_dir = os.path.join(runs_root, f"pretrain_seed{seed}", method.replace(" ", "_"))
            pretrain_dirs.append(run_dir)
            converted = run_dir + ".pkl"
            weights[(method, seed)] = converted
            steps = []
            if not os.path.exists(os.path.join(run_dir, "model_final.pth")):
                os.makedirs(run_dir, exist_ok=True)
                steps.append(([py, "pretrain_net.py", "--config-file", config, "OUTPUT_DIR", run_dir,
                               "SEED", str(seed)] + common + short_schedule(args.pretrain_iters),
                              os.path.join(run_dir, "stdout.log")))
            variants = [(converted, [], "convert.log")]
            if method == "2DRCL":
                weights[("2DRCL backbone", seed)] = run_dir + "_backbone.pkl"
                variants.append((run_dir + "_backbone.pkl", ["--backbone-only"], "convert_backbone.log"))
            for output, flags, log in variants:
                if not os.path.exists(output):
                    steps.append(([py, "-m", "drcl_d2.checkpoint", os.path.join(run_dir, "model_final.pth"),
                                   output, "--target-config", SAMPLER_CONFIGS["DRB"]] + flags + ["--opts"]
                                  + common, os.path.join(run_dir, log)))
            if steps:
                pretrain_jobs.append((f"pretrain {method} seed {seed}", steps))
    # The final pretraining checkpoint stays: a later conversion (or a new start row) reads it.
    run_all(pretrain_jobs, args.jobs, threads, "pretraining + drcl-convert",
            "all" if args.keep_checkpoints else "final")

    finetune_dirs, finetune_jobs = {}, []
    for seed in args.seeds:
        for start, sampler in CELLS:
            run_dir = os.path.join(runs_root, f"seed{seed}", f"finetune_{start.replace(' ', '_')}_{sampler}")
            finetune_dirs.setdefault(f"{start} + {sampler}", []).append(run_dir)
            try:
                read_final_metrics(os.path.join(run_dir, "metrics.json"))
                continue
            except (FileNotFoundError, ValueError):
                pass
            os.makedirs(run_dir, exist_ok=True)
            init = "" if start == "none" else weights[(start, seed if args.pretrain_per_seed else 0)]
            finetune_jobs.append((f"{start} + {sampler} seed {seed}", [
                ([py, "train_net.py", "--config-file", SAMPLER_CONFIGS[sampler], "OUTPUT_DIR", run_dir,
                  "SEED", str(seed), "MODEL.WEIGHTS", init, "DATASETS.TEST", "('lt_val',)",
                  "TEST.DETECTIONS_PER_IMAGE", str(args.detections)]
                 + common + short_schedule(args.finetune_iters),
                 os.path.join(run_dir, "stdout.log")),
            ]))
    run_all(finetune_jobs, args.jobs, threads, "fine-tuning + LVIS evaluation",
            "all" if args.keep_checkpoints else "none")
    results = {name: [read_final_metrics(os.path.join(d, "metrics.json")) for d in dirs]
               for name, dirs in finetune_dirs.items()}
    run_dirs = [d for dirs in finetune_dirs.values() for d in dirs] + pretrain_dirs
    run_seconds = sum(float(open(os.path.join(d, WALL_FILE)).read()) for d in run_dirs
                      if os.path.exists(os.path.join(d, WALL_FILE)))

    def cell(runs, task, metric):
        values = [r[task][metric] for r in runs if r.get(task, {}).get(metric, -100.0) != -100.0]
        if not values:
            return "n/a"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {std:.1f}"

    env = environment()
    wall = time.time() - start_time
    settings = (f"embedded `{args.preset}` set ({PRESETS[args.preset]['num_train_images']} train / "
                f"{PRESETS[args.preset]['num_val_images']} val images, {PRESETS[args.preset]['num_categories']} "
                f"categories), Mask R-CNN R{args.depth}-FPN on {args.device} from scratch or from the converted "
                f"pretraining "
                f"({'one pretraining per seed' if args.pretrain_per_seed else 'one pretraining, seed 0, per method'}), "
                f"{args.pretrain_iters} pretraining and {args.finetune_iters} fine-tuning iterations at batch 4, "
                f"{args.size}-px images, {args.detections} detections per image, fine-tuning seeds {args.seeds}")
    lines = [f"## Long-tail results table (embedded dataset, R{args.depth}, {args.device})", "",
             f"`python benchmarks/longtail_table.py{' --quick' if args.quick else ''}` — {settings}; "
             f"{len(run_dirs)} runs took {run_seconds / 60:.0f} min of run time, {args.jobs} at a time on "
             f"{env['cpu_count']} cores (about {run_seconds / 60 / args.jobs:.0f} min of wall time); "
             f"commit {env['commit']}. "
             "Mean ± std over seeds; n/a = no detections in that group for every seed.", "",
             "| start + sampler | " + " | ".join(f"bbox {m}" for m in METRICS) + " | "
             + " | ".join(f"segm {m}" for m in METRICS) + " |",
             "|---|" + "---|" * (2 * len(METRICS))]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(runs, "bbox", m) for m in METRICS) + " | "
                     + " | ".join(cell(runs, "segm", m) for m in METRICS) + " |")
    write_result("longtail_table" + ("" if args.device == "cpu" else f"_{args.device}_R{args.depth}")
                 + ("_quick" if args.quick else ""),
                 {"settings": settings, "seeds": args.seeds, "runs": results, "run_seconds": run_seconds,
                  "jobs": args.jobs, "invocation_seconds": wall, "env": env})
    if not args.quick:
        update_benchmarks_md("longtail" if args.device == "cpu" else f"longtail_{args.device}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
