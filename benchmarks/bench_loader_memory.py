#!/usr/bin/env python
"""Data-loader workers' private memory over a long run: 2DRCL, DetCo and MoCo v2 pretraining, and
fine-tuning (DRB), each through its trainer's own loader on the embedded `small` set.

Private memory (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup) is what a worker holds
alone: what adds up over 8 GPUs x N workers. It is sampled in every worker as the run advances;
growth is measured from the end of warm-up (WARMUP of the samples) to the end.

    python benchmarks/bench_loader_memory.py [--samples-per-worker 2000] [--workers 2]

Writes benchmarks/results/loader_memory.json and a BENCHMARKS.md section. Goal: growth < 5 % after
warm-up for every loader.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import environment, update_benchmarks_md, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Warm-up: the first quarter of the samples. Worker memory rises over the first few hundred samples
# (allocator pools, decoded-image buffers of the largest sizes met so far) and is flat after that
# when nothing leaks (see the traces in benchmarks/results/loader_memory.json).
WARMUP = 0.25
LOADERS = {
    "2DRCL (two views + boxes)": ("configs/embedded/drcl_R_18_FPN_embedded.yaml", True),
    "DetCo (views + jigsaw)": ("configs/embedded/detco_R_18_embedded.yaml", True),
    "MoCo v2 (two views)": ("configs/embedded/moco_v2_R_18_embedded.yaml", True),
    "fine-tuning (DRB)": ("configs/embedded/mask_rcnn_R_18_FPN_drb.yaml", False),
}


def private_mib(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_"):
                total += int(line.split()[1])
    return total / 1024


def worker_pids() -> list[int]:
    """Child processes of this one (the data-loader workers)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(pids)


def run_loader(config: str, pretraining: bool, data: str, workers: int, samples_per_worker: int, batch: int):
    from detectron2.config import get_cfg

    from drcl_d2 import add_drcl_config
    from drcl_d2.data.datasets import register_datasets_from_config
    from drcl_d2.engine.pretrain import PretrainTrainer
    from drcl_d2.engine.trainer import Trainer

    cfg = add_drcl_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, config))
    name = "bench_mem_" + os.path.basename(config).split(".")[0]
    cfg.DATASETS.LVIS_CUSTOM = [[name, os.path.join(data, "lvis_v1_train.json"), data]]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    cfg.DATASETS.IMAGE_FOLDERS = []
    cfg.DATALOADER.NUM_WORKERS, cfg.SOLVER.IMS_PER_BATCH = workers, batch
    cfg.SOLVER.MAX_ITER = 10**6
    register_datasets_from_config(cfg)
    trainer_cls = PretrainTrainer if pretraining else Trainer
    loader = trainer_cls.build_train_loader(cfg)
    batches = samples_per_worker * workers // batch
    every = max(1, batches // 20)
    trace, t0 = [], time.perf_counter()
    for i, _ in enumerate(loader):
        if i % every == 0 or i == batches - 1:
            pids = worker_pids()
            trace.append({"samples_per_worker": (i + 1) * batch / workers,
                          "private_mib": [round(private_mib(p), 1) for p in pids]})
        if i + 1 >= batches:
            break
    seconds = time.perf_counter() - t0
    del loader
    return dict(growth_after_warmup(trace, samples_per_worker), trace=trace, seconds=round(seconds, 1))


def growth_after_warmup(trace: list[dict], samples_per_worker: int) -> dict:
    """Private memory of each worker at the end of warm-up and at the end, and the growth in %."""
    warm = next(t for t in trace if t["samples_per_worker"] >= WARMUP * samples_per_worker)
    end = trace[-1]
    growth = [100.0 * (b - a) / a for a, b in zip(warm["private_mib"], end["private_mib"])]
    return {"warm": warm, "end": end, "growth_percent": [round(g, 1) for g in growth]}


def package_commit() -> str:
    """The commit of the drcl_d2 package imported (PYTHONPATH may point at an older checkout)."""
    import subprocess

    import drcl_d2

    folder = os.path.dirname(os.path.dirname(os.path.abspath(drcl_d2.__file__)))
    try:
        return subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="datasets/embedded_small")
    parser.add_argument("--samples-per-worker", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="a subset of the loaders (name prefixes)")
    parser.add_argument("--label", default="", help="a label for this run in the results (e.g. 'before')")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from the saved results")
    args = parser.parse_args()
    if args.report_only:
        saved = json.load(open(os.path.join(ROOT, "benchmarks", "results", "loader_memory.json")))
        return write_table(saved["loaders"], saved["env"], saved["workers"], saved["samples_per_worker"], saved["batch"])
    torch.set_num_threads(1)
    from drcl_d2.data.synthetic import PRESETS, make_longtail_dataset

    data = os.path.join(ROOT, args.data)
    make_longtail_dataset(data, **PRESETS["small"])
    rows = {}
    for name, (config, pretraining) in LOADERS.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        rows[name] = run_loader(config, pretraining, data, args.workers, args.samples_per_worker, args.batch)
        r = rows[name]
        print(f"{name}: private MiB per worker {r['warm']['private_mib']} after warm-up -> "
              f"{r['end']['private_mib']} ({r['growth_percent']} %) in {r['seconds']} s", flush=True)
    env = environment()
    env["code_commit"] = package_commit()
    suffix = f"_{args.label}" if args.label else ""
    write_result("loader_memory" + suffix, {"samples_per_worker": args.samples_per_worker, "workers": args.workers,
                                            "batch": args.batch, "label": args.label, "loaders": rows, "env": env})
    if not args.label:  # a labelled run (e.g. on an older commit) is kept beside the table, not in it
        write_table(rows, env, args.workers, args.samples_per_worker, args.batch)


def write_table(rows: dict, env: dict, workers: int, samples_per_worker: int, batch: int) -> None:
    lines = ["## Data-loader worker memory over a long run", "",
             f"`python benchmarks/bench_loader_memory.py` — each trainer's own loader on the embedded `small` set, "
             f"{workers} workers, {samples_per_worker} samples per worker, batch {batch}; private "
             f"memory (smaps Private_*) of each worker after {int(WARMUP * 100)} % of the samples and at the end; "
             f"commit {env['code_commit']}. Goal: growth < 5 %.", "",
             "| loader | MiB per worker after warm-up | at the end | growth | goal met |", "|---|---|---|---|---|"]
    before = os.path.join(ROOT, "benchmarks", "results", "loader_memory_before.json")
    labelled = [(name, r) for name, r in rows.items()]
    if os.path.exists(before):  # the same loaders run on an older commit with --label before
        old = json.load(open(before))
        commit, samples = old["env"].get("code_commit", old["env"]["commit"]), old["samples_per_worker"]
        labelled += [(f"{name}, before (commit {commit}, {samples} samples per worker)",
                      growth_after_warmup(r["trace"], samples)) for name, r in old["loaders"].items()]
    for name, r in labelled:
        ok = all(g < 5 for g in r["growth_percent"])
        lines.append(f"| {name} | {' / '.join(f'{v:.0f}' for v in r['warm']['private_mib'])} | "
                     f"{' / '.join(f'{v:.0f}' for v in r['end']['private_mib'])} | "
                     f"{' / '.join(f'{g:+.1f} %' for g in r['growth_percent'])} | {'yes' if ok else 'no'} |")
    update_benchmarks_md("Data-loader worker memory over a long run", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
