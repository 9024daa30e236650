#!/usr/bin/env python
"""The long-tail results table: one fine-tuning schedule from different starts, with a positive control.

Starts (each made here on the same embedded training images, then converted with drcl-convert):
  scratch          no pretraining (the baseline)
  supervised       the POSITIVE CONTROL: the same detector trained with labels on the training set for
                   the pretraining budget, transferred like 2DRCL (ResNet, FPN, RPN, box head; the
                   class-specific predictor dropped). A start known to be better than scratch: the
                   table is valid only when this row beats scratch by more than 2 seed-std.
  MoCo v2, DetCo   self-supervised ResNet (backbone only)
  2DRCL            the whole detector (ResNet, FPN, RPN, box head)
  2DRCL backbone   the same checkpoint converted --backbone-only
Samplers: RFS and Dynamic Rebalancing (DRB) where the comparison needs both (scratch, 2DRCL), DRB
elsewhere. Every row uses the same detector (Faster R-CNN R-18-FPN with the BN'd FPN and conv box head
of configs/embedded/Base-embedded.yaml). Each cell is fine-tuned and evaluated with LVISEvaluator for
3 seeds: mean ± std of bbox AP, APr, APc, APf, with the commit.

Two further signals per start: the transfer scale that drcl-convert reports (FPN std, fc7 norm and
fresh-classifier logits against a fresh detector), and a kNN probe of RoI features of ground-truth
boxes (drcl_d2.tools.probe) per frequency group, which shows whether pretraining changed the
representation at all.

    python benchmarks/longtail_table.py            # 'table' embedded set, 3 seeds (about 90 min on 2 cores)
    python benchmarks/longtail_table.py --quick    # tiny set, 1 seed, a few iterations (checks the plumbing)
    python benchmarks/longtail_table.py --depth 50 --device cuda --size 512 --finetune-iters 1000 --jobs 1

Every step is the project's own command line; finished runs are reused, so an interrupted table
continues where it stopped. Writes benchmarks/results/longtail_table.json and the "longtail" section
of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import glob
import json
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
    "RFS": "configs/embedded/mask_rcnn_R_18_FPN_rfs.yaml",
    "DRB": "configs/embedded/mask_rcnn_R_18_FPN_drb.yaml",
}
SCRATCH, CONTROL = "scratch", "supervised"
STARTS = (SCRATCH, CONTROL, "MoCo v2", "DetCo", "2DRCL", "2DRCL backbone")
SOFTMAX = "softmax_ce"
# (start, sampler, MODEL.ROI_BOX_HEAD.CLS_LOSS) of every fine-tuning cell.
CELLS = [(SCRATCH, "RFS", SOFTMAX), (SCRATCH, "DRB", SOFTMAX), (CONTROL, "DRB", SOFTMAX),
         ("MoCo v2", "DRB", SOFTMAX), ("DetCo", "DRB", SOFTMAX), ("2DRCL", "RFS", SOFTMAX),
         ("2DRCL", "DRB", SOFTMAX), ("2DRCL backbone", "DRB", SOFTMAX)]
# The loss rows: no pretraining, each long-tail loss with each sampler (softmax CE: the rows above).
LOSSES = (SOFTMAX, "federated", "eqlv2", "seesaw", "ecm")
LOSS_CELLS = [(SCRATCH, sampler, loss) for sampler in ("RFS", "DRB") for loss in LOSSES]
# detectron2 keeps 50 of LVIS's 1203 classes in the federated loss: with about 7 classes in a
# 2-image LVIS batch that samples ~3.6 % of the other classes as negatives. A 4-image batch of
# the 40-class embedded set holds about 6 classes; 8 keeps a similar share of sampled negatives.
FED_LOSS_NUM_CLASSES = 8
# What the positive control transfers: what a 2DRCL conversion transfers (no class-specific predictor,
# no mask head, which 2DRCL does not pretrain).
CONTROL_DROPPED_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_head.")
WALL_FILE = "wall_seconds.txt"  # written beside each finished run: the table adds them up
METRICS = ("AP", "APr", "APc", "APf")


def cell_name(start: str, sampler: str, loss: str) -> str:
    return f"{start} + {sampler}" + ("" if loss == SOFTMAX else f" + {loss}")


def loss_opts(loss: str) -> list[str]:
    """Config overrides of a classification loss (none for softmax CE, the configs' default)."""
    if loss == SOFTMAX:
        return []
    opts = ["MODEL.ROI_BOX_HEAD.CLS_LOSS", loss]
    return opts + (["MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", str(FED_LOSS_NUM_CLASSES)] if loss == "federated" else [])


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


def strip_for_transfer(checkpoint: str, output: str) -> int:
    """The positive control's transfer: a detectron2 checkpoint without the class-specific predictor
    and the mask head, written as a .pth loaded by exact names. Returns the number of tensors kept."""
    import torch

    from drcl_d2.engine.checkpoint import atomic_torch_save

    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    kept = {k: v for k, v in model.items() if not k.startswith(CONTROL_DROPPED_PREFIXES)}
    atomic_torch_save({"model": kept}, output)
    return len(kept)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def positive_control_verdict(results: dict, metric: str = "AP") -> dict:
    """The table is valid when the positive control beats scratch (same sampler) by more than
    2 seed-std (the larger of the two rows' std): otherwise it cannot tell a better start."""
    control = [r["bbox"][metric] for r in results.get(f"{CONTROL} + DRB", [])]
    scratch = [r["bbox"][metric] for r in results.get(f"{SCRATCH} + DRB", [])]
    if len(control) < 2 or len(scratch) < 2:
        return {"valid": False, "reason": "positive control or scratch row has fewer than 2 seeds"}
    (mc, sc), (ms, ss) = mean_std(control), mean_std(scratch)
    margin = mc - ms
    threshold = 2 * max(sc, ss)
    return {"valid": margin > threshold, "margin": margin, "threshold": threshold, "metric": metric}


def prepare_starts(args, py, runs_root, common, detector, threads, keep, short_schedule):
    """Steps 1-2: every start's weights (pretraining + drcl-convert, the positive control) and its kNN
    probe. Returns (weights by start, pretraining run folders, probe files by start)."""
    # 1. Starts: pretraining (+ conversion), one per method with seed 0.
    pre_root = os.path.join(runs_root, "pretrain_seed0")
    weights, pretrain_dirs, pretrain_jobs = {SCRATCH: ""}, [], []
    for method, config in PRETRAIN_CONFIGS.items():
        run_dir = os.path.join(pre_root, method.replace(" ", "_"))
        pretrain_dirs.append(run_dir)
        weights[method] = run_dir + ".pkl"
        steps = []
        if not os.path.exists(os.path.join(run_dir, "model_final.pth")):
            os.makedirs(run_dir, exist_ok=True)
            steps.append(([py, "pretrain_net.py", "--config-file", config, "OUTPUT_DIR", run_dir, "SEED", "0"]
                          + common + short_schedule(args.pretrain_iters), os.path.join(run_dir, "stdout.log")))
        variants = [(weights[method], [], "convert.log")]
        if method == "2DRCL":
            weights["2DRCL backbone"] = run_dir + "_backbone.pkl"
            variants.append((weights["2DRCL backbone"], ["--backbone-only"], "convert_backbone.log"))
        for output, flags, log in variants:
            if not os.path.exists(output):
                steps.append(([py, "-m", "drcl_d2.checkpoint", os.path.join(run_dir, "model_final.pth"), output,
                               "--target-config", SAMPLER_CONFIGS["DRB"], "--scale-dataset", "lt_val"] + flags
                              + ["--opts"] + detector, os.path.join(run_dir, log)))
        if steps:
            pretrain_jobs.append((f"pretrain {method}", steps))
    # The positive control: supervised training of the same detector for the same budget, with labels.
    control_dir = os.path.join(pre_root, CONTROL)
    pretrain_dirs.append(control_dir)
    weights[CONTROL] = control_dir + ".pth"
    if not os.path.exists(weights[CONTROL]):
        os.makedirs(control_dir, exist_ok=True)
        pretrain_jobs.append((f"pretrain {CONTROL} (positive control)", [
            ([py, "train_net.py", "--config-file", SAMPLER_CONFIGS["DRB"], "OUTPUT_DIR", control_dir, "SEED", "0"]
             + detector + ["DATASETS.TEST", "()"] + short_schedule(args.pretrain_iters),
             os.path.join(control_dir, "stdout.log"))]))
    run_all(pretrain_jobs, args.jobs, threads, "pretraining + drcl-convert", keep)
    if not os.path.exists(weights[CONTROL]):
        kept = strip_for_transfer(os.path.join(control_dir, "model_final.pth"), weights[CONTROL])
        print(f"positive control: {kept} tensors transferred to {weights[CONTROL]}", flush=True)

    # 2. kNN probe of every start's RoI features (ResNet res5 and box head) on ground-truth boxes.
    probe_files, probe_jobs = {}, []
    for start in STARTS:
        path = os.path.join(pre_root, f"probe_{start.replace(' ', '_')}.json")
        probe_files[start] = path
        if not os.path.exists(path):
            probe_jobs.append((f"probe {start}", [
                ([py, "-m", "drcl_d2.tools.probe", "--config-file", SAMPLER_CONFIGS["DRB"], "--weights",
                  weights[start], "--train-dataset", "lt_train", "--test-dataset", "lt_val",
                  "--max-train-images", str(args.probe_images[0]), "--max-test-images", str(args.probe_images[1]),
                  "--output", path] + detector, path[:-5] + ".log")]))
    run_all(probe_jobs, args.jobs, threads, "kNN probes", "all")

    return weights, pretrain_dirs, probe_files


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/longtail")
    parser.add_argument("--preset", default="table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-iters", type=int, default=150)
    parser.add_argument("--finetune-iters", type=int, default=200)
    parser.add_argument("--size", type=int, default=160, help="short side of training / test images")
    parser.add_argument("--detections", type=int, default=50,
                        help="TEST.DETECTIONS_PER_IMAGE (the set has at most 6 objects per image)")
    parser.add_argument("--probe-images", type=int, nargs=2, default=[600, 300], metavar=("TRAIN", "TEST"),
                        help="images of the train / val split whose ground-truth RoIs the kNN probe uses")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: cores / jobs)")
    parser.add_argument("--depth", type=int, default=18, choices=(18, 50),
                        help="ResNet depth; 50 also widens FPN and heads to detectron2's R50-FPN sizes")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE of every run (cuda: the R-50 scale)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every checkpoint (default: only the final pretraining ones; results are in "
                             "each run's metrics.json)")
    parser.add_argument("--quick", action="store_true", help="tiny set, 1 seed, 3 iterations: checks the plumbing")
    parser.add_argument("--losses-only", action="store_true",
                        help="only the loss rows (no pretraining: {softmax_ce, federated, eqlv2, seesaw, ecm} x "
                             "{RFS, DRB}), written to their own section of BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="with --losses-only: write the section from the runs that finished, run nothing")
    args = parser.parse_args()
    if args.report_only and not args.losses_only:
        parser.error("--report-only goes with --losses-only")
    if args.quick:
        args.preset, args.seeds, args.pretrain_iters, args.finetune_iters, args.size = "tiny", [0], 2, 3, 128
        args.probe_images = [40, 20]
        args.output = args.output.rstrip("/") + "_quick"

    from drcl_d2.data.synthetic import PRESETS, make_longtail_dataset
    from drcl_d2.tools.demo import short_schedule
    from drcl_d2.tools.plots import read_final_metrics

    py, start_time = sys.executable, time.time()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    preset = PRESETS[args.preset]
    out = os.path.join(ROOT, args.output)
    data = os.path.join(out, f"data_{args.preset}")
    make_longtail_dataset(data, **preset)
    # Finished runs are reused only under the same settings: they live in a folder named by them.
    runs_root = os.path.join(out, f"{args.preset}_R{args.depth}_{args.size}px_pre{args.pretrain_iters}"
                                  f"_ft{args.finetune_iters}_det{args.detections}")
    datasets = repr([["lt_train", f"{data}/lvis_v1_train.json", data], ["lt_val", f"{data}/lvis_v1_val.json", data]])
    common = ["DATASETS.LVIS_CUSTOM", datasets, "DATASETS.TRAIN", "('lt_train',)",
              "MODEL.ROI_HEADS.NUM_CLASSES", str(preset["num_categories"]),
              "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MIN_SIZE_TEST", str(args.size),
              "INPUT.MAX_SIZE_TRAIN", str(args.size * 5 // 4), "INPUT.MAX_SIZE_TEST", str(args.size * 5 // 4),
              "DATALOADER.NUM_WORKERS", "1", "MODEL.DEVICE", args.device]
    if args.depth == 50:  # detectron2's R50-FPN widths (the embedded configs narrow them for R-18)
        common += ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                   "MODEL.FPN.OUT_CHANNELS", "256", "MODEL.ROI_BOX_HEAD.FC_DIM", "1024",
                   "MODEL.ROI_BOX_HEAD.CONV_DIM", "256", "MODEL.ROI_MASK_HEAD.CONV_DIM", "256"]
    # Every detector of the table is a Faster R-CNN (box AP; the mask head would only add CPU time).
    detector = common + ["MODEL.MASK_ON", "False", "DATASETS.TEST", "('lt_val',)",
                         "TEST.DETECTIONS_PER_IMAGE", str(args.detections)]
    keep = "all" if args.keep_checkpoints else "final"

    if args.losses_only:  # from scratch: no pretraining, no probes
        weights, pretrain_dirs, probe_files, cells = {SCRATCH: ""}, [], {}, LOSS_CELLS
    else:
        weights, pretrain_dirs, probe_files = prepare_starts(args, py, runs_root, common, detector, threads, keep,
                                                             short_schedule)
        cells = CELLS + [cell for cell in LOSS_CELLS if cell[2] != SOFTMAX]

    # 3. Fine-tuning + LVIS evaluation, 3 seeds per cell.
    finetune_dirs, finetune_jobs = {}, []
    for seed in args.seeds:
        for start, sampler, loss in cells:
            run_dir = os.path.join(runs_root, f"seed{seed}", f"finetune_{start.replace(' ', '_')}_{sampler}"
                                   + ("" if loss == SOFTMAX else f"_{loss}"))
            finetune_dirs.setdefault(cell_name(start, sampler, loss), []).append(run_dir)
            try:
                read_final_metrics(os.path.join(run_dir, "metrics.json"))
                continue
            except (FileNotFoundError, ValueError):
                if args.report_only:  # not finished: its cell reads "n/a"
                    finetune_dirs[cell_name(start, sampler, loss)].remove(run_dir)
                    continue
            os.makedirs(run_dir, exist_ok=True)
            finetune_jobs.append((f"{cell_name(start, sampler, loss)} seed {seed}", [
                ([py, "train_net.py", "--config-file", SAMPLER_CONFIGS[sampler], "OUTPUT_DIR", run_dir,
                  "SEED", str(seed), "MODEL.WEIGHTS", weights[start]] + detector + loss_opts(loss)
                 + short_schedule(args.finetune_iters), os.path.join(run_dir, "stdout.log")),
            ]))
    run_all(finetune_jobs, args.jobs, threads, "fine-tuning + LVIS evaluation",
            "all" if args.keep_checkpoints else "none")

    # 4. The tables.
    results = {name: [read_final_metrics(os.path.join(d, "metrics.json")) for d in dirs]
               for name, dirs in finetune_dirs.items()}
    probes = {start: json.load(open(path)) for start, path in probe_files.items()}
    scales = {start: json.load(open(weights[start] + ".scale.json")) for start in STARTS
              if weights.get(start) and os.path.exists(weights[start] + ".scale.json")}
    verdict = {"valid": False, "reason": "loss rows only"} if args.losses_only else positive_control_verdict(results)
    run_dirs = [d for dirs in finetune_dirs.values() for d in dirs] + pretrain_dirs
    run_seconds = sum(float(open(os.path.join(d, WALL_FILE)).read()) for d in run_dirs
                      if os.path.exists(os.path.join(d, WALL_FILE)))
    env = environment()
    wall = time.time() - start_time
    md = format_tables(args, preset, results, probes, scales, verdict, run_seconds, len(run_dirs), env)
    section = "longtail_losses" if args.losses_only else "longtail"
    write_result(section.replace("longtail", "longtail_table", 1)
                 + ("" if args.device == "cpu" else f"_{args.device}_R{args.depth}") + ("_quick" if args.quick else ""),
                 {"settings": vars(args), "runs": results, "probes": probes, "scales": scales,
                  "positive_control": verdict, "run_seconds": run_seconds, "invocation_seconds": wall, "env": env})
    if not args.quick:
        update_benchmarks_md(section if args.device == "cpu" else f"{section}_{args.device}", md)
    print(md)


def _cell(runs, metric):
    if not runs:
        return "not run"
    values = [r["bbox"][metric] for r in runs if r.get("bbox", {}).get(metric, -100.0) != -100.0]
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f} ± {s:.1f}"


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}"


def format_tables(args, preset, results, probes, scales, verdict, run_seconds, num_runs, env) -> str:
    settings = (f"embedded `{args.preset}` set ({preset['num_train_images']} train / {preset['num_val_images']} val "
                f"images, {preset['num_categories']} categories), Faster R-CNN R{args.depth}-FPN (BN'd FPN, conv "
                f"box head) on {args.device}; {args.pretrain_iters} pretraining iterations per start (seed 0), "
                f"{args.finetune_iters} fine-tuning iterations at batch 4, {args.size}-px images, "
                f"{args.detections} detections per image, fine-tuning seeds {args.seeds}")
    if args.losses_only:
        check = ("Loss rows only (`--losses-only`): no pretraining, the positive control is in the main table; "
                 f"federated keeps {FED_LOSS_NUM_CLASSES} classes (MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES).")
    elif verdict.get("valid"):
        check = (f"**Positive control passed**: supervised + DRB beats scratch + DRB by {verdict['margin']:.1f} AP "
                 f"(needed > {verdict['threshold']:.1f}, 2 seed-std), so the protocol can tell a better start.")
    elif "margin" in verdict:
        check = (f"**Positive control FAILED**: supervised + DRB beats scratch + DRB by only {verdict['margin']:.1f} "
                 f"AP (needed > {verdict['threshold']:.1f}); the table cannot tell starts apart.")
    else:
        check = f"**Positive control missing** ({verdict['reason']})."
    title = "Long-tail loss rows" if args.losses_only else "Long-tail results table"
    flags = (" --quick" if args.quick else "") + (" --losses-only" if args.losses_only else "") + (
        f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
    lines = [f"## {title} (embedded dataset, R{args.depth}, {args.device})", "",
             f"`python benchmarks/longtail_table.py{flags}` — {settings}. "
             f"{num_runs} runs took {run_seconds / 60:.0f} min of run time, {args.jobs} at a time on "
             f"{env['cpu_count']} cores; commit {env['commit']}. Mean ± std over seeds.", "", check, "",
             "| start + sampler | bbox AP | APr | APc | APf |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(runs, m) for m in METRICS) + " |")
    if args.losses_only:
        return "\n".join(lines)
    lines += ["", "kNN probe (k=20, cosine, temperature-weighted vote) of ground-truth RoI features, "
              f"{args.probe_images[0]} train → {args.probe_images[1]} val images; accuracy % and mean per-class "
              "accuracy per LVIS frequency group (r / c / f):", "",
              "| start | res5 acc | res5 r / c / f class-acc | box head acc | box head r / c / f class-acc |",
              "|---|---|---|---|---|"]
    for start, p in probes.items():
        cells = []
        for feature in ("backbone", "box_head"):
            f = p.get(feature, {})
            cells += [_pct(f.get("acc")), " / ".join(_pct(f.get(f"mean_class_acc_{g}")) for g in "rcf")]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    if scales:
        lines += ["", "Transfer scale (drcl-convert --target-config, converted / fresh detector, 4 val images; goals: "
                  "FPN std 0.8–1.2×, fc7 ≤ 4×, largest fresh-classifier logit < 2):", "",
                  "| start | FPN std ratio (p2–p6) | fc7 norm ratio | max logit | warnings |", "|---|---|---|---|---|"]
        for start, s in scales.items():
            fpn = [v["std"] for k, v in s["ratio"]["features"].items() if k.startswith("p") and v.get("std")]
            fpn_txt = f"{min(fpn):.2f}–{max(fpn):.2f}" if fpn else "—"
            fc7 = s["ratio"].get("fc7_norm")
            lines.append(f"| {start} | {fpn_txt} | {'—' if fc7 is None else f'{fc7:.2f}'} | "
                         f"{s['converted']['cls_logit_max_abs']:.2f} | {len(s.get('warnings', []))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
