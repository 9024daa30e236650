#!/usr/bin/env python
"""Launched ops and host syncs in one training step: Mask R-CNN, 2DRCL, MoCo v2, DetCo.

On a GPU these pretraining steps are bound by the CPU that launches kernels (BENCHMARKS.md: 34–43 µs
per launched op on an H100), so the number of ops a step launches, and the host syncs that stall the
launch queue, are the CPU-side proxy for GPU step time. Both are deterministic: no timing noise.

A step is what the trainer runs: forward, backward, SGD step, and the EMA target update (2DRCL),
measured on the second step (the first builds lazy caches; the second also flushes the keys the
first one queued). Counted under a TorchDispatchMode, which sees every aten op that reaches a
kernel, in forward and in backward:

* launched ops of the model step (forward, backward, EMA update; the SGD step is reported
  apart): every op except
  - views and aliases (the op's schema returns an alias of an input: view, reshape as a view,
    transpose, select, slice, expand, unsqueeze, detach, ...): metadata only, no kernel;
  - allocations (empty.memory_format, empty_strided, empty_like, new_empty, new_empty_strided):
    the caching allocator, no kernel;
  - lift_fresh / lift_fresh_copy (torch.tensor(...) from Python data: counted as a host-to-device
    creation below instead).
* host syncs, as they would be on a GPU:
  - _local_scalar_dense: .item(), int(t), float(t), bool(t), `if t:`, is_nonzero;
  - ops whose output shape depends on values (the host must read the device): nonzero,
    masked_select, unique*, repeat_interleave without output_size, index with a boolean mask;
  - .tolist() / .numpy() of a tensor (patched Python methods: on CPU they dispatch nothing);
  - device-to-host copies (_to_copy / copy_ from a CUDA tensor to a CPU one; CUDA only);
  except reads in HOST_SITES (detectron2's ImageList.from_tensors reads CPU tensors of the image
  shapes, on a GPU run as well): reported apart. Each sync's code location is in the JSON.
* host-to-device creations (not syncs, but a blocking copy from pageable memory on a GPU):
  torch.tensor(python data) on the step's device, and CPU-to-CUDA copies.

    python benchmarks/bench_step_ops.py                 # CPU, batch 2 and 32, writes step_ops_cpu.json
    python benchmarks/bench_step_ops.py --device cuda   # the same counts on a GPU
    python benchmarks/bench_step_ops.py --label before  # a named result file, no BENCHMARKS.md update
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
               aten.new_empty.default, aten.new_empty_strided.default}
LIFTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                  "unique_dim", "nonzero_static"}
GOALS = {"moco": 700, "detco": 1700, "drcl": 3300}  # launched ops per step at batch 2 (issue 13)
LABELS = {"maskrcnn": "Mask R-CNN R50-FPN (detectron2)", "drcl": "2DRCL R50-FPN (all terms)",
          "moco": "MoCo v2 R-50", "detco": "DetCo R-50"}


def _is_sync(func, args, kwargs) -> str | None:
    """The kind of host sync `func` would force on a GPU, or None."""
    name = func._schema.name.split("::")[-1]
    if func is aten._local_scalar_dense.default:
        return "item"
    if name in DATA_DEPENDENT:
        return "data_dependent_shape"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "data_dependent_shape"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "data_dependent_shape"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if src.device.type == "cuda" and dst_device is not None and torch.device(dst_device).type == "cpu":
            return "device_to_host"
    return None


def _is_host_to_device(func, args, kwargs) -> bool:
    if func in LIFTS:
        return True
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device")
        return src.device.type == "cpu" and dst_device is not None and torch.device(dst_device).type == "cuda"
    return False


# Code whose "syncs" read tensors that live on the host in a GPU run too: detectron2's
# ImageList.from_tensors computes the padded size from CPU tensors of the image shapes. On CPU every
# tensor is a host tensor, so these are told apart by where they happen.
HOST_SITES = ("detectron2/structures/image_list.py",)


def _site() -> str:
    """file:line of the innermost Python frame outside torch (where a sync is asked for)."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("bench_step_ops.py"):
            return f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}"
    return "?"


class StepOpCounter(TorchDispatchMode):
    """Counts launched ops, host syncs and host-to-device creations, per phase of the step."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops = collections.Counter()  # phase -> launched ops
        self.op_names = collections.Counter()  # aten op name -> launched ops
        self.syncs = collections.Counter()  # (phase, kind) -> count
        self.sync_sites = collections.Counter()  # "kind at file:line" -> count
        self.host_reads = collections.Counter()  # HOST_SITES reads: not syncs on a GPU
        self.host_to_device = collections.Counter()  # phase -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = _is_sync(func, args, kwargs)
        if sync:
            site = _site()
            if any(h in site for h in HOST_SITES):
                self.host_reads[site] += 1
            else:
                self.syncs[(self.phase, sync)] += 1
                self.sync_sites[f"{sync} at {site}"] += 1
        if _is_host_to_device(func, args, kwargs):
            self.host_to_device[self.phase] += 1
        elif not func.is_view and func not in ALLOCATIONS:
            self.ops[self.phase] += 1
            self.op_names[str(func.overloadpacket).split(".")[-1]] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def python_reads(self):
        """.tolist() / .numpy() read a tensor on the host without dispatching an op on CPU."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def wrap(name):
            def reader(t, *a, **k):
                self.syncs[(self.phase, name)] += 1
                self.sync_sites[f"{name} at {_site()}"] += 1
                return originals[name](t, *a, **k)
            return reader

        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


def count_step(kind: str, device: str, batch: int, h: int, w: int) -> dict:
    from bench_pretrain_step import build, make_inputs
    from detectron2.utils.events import EventStorage

    model = build(kind, device)
    inputs = make_inputs(kind, batch, h, w)
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: every op of the update runs, the random weights do not drift (see bench_pretrain_step.py).
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    counter = StepOpCounter()
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            mode = contextlib.ExitStack()
            if it == 1:  # count the second, steady-state step
                mode.enter_context(counter)
                mode.enter_context(counter.python_reads())
            with mode:
                counter.phase = "forward"
                losses = model(inputs)
                loss = sum(losses.values())
                counter.phase = "backward"
                opt.zero_grad()
                loss.backward()
                counter.phase = "optimizer"
                opt.step()
                counter.phase = "ema"
                if hasattr(model, "update_target"):
                    model.update_target(it)
    model_syncs = sum(v for (phase, _), v in counter.syncs.items() if phase != "optimizer")
    return {
        "kind": kind, "batch": batch, "height": h, "width": w, "device": device,
        # The model step: the SGD step is left out (on a GPU torch's default foreach SGD is a handful
        # of ops whatever the model; on CPU it loops over tensors). It is reported beside.
        "ops": sum(v for phase, v in counter.ops.items() if phase != "optimizer"),
        "optimizer_ops": counter.ops["optimizer"], "ops_by_phase": dict(counter.ops),
        "host_syncs": sum(counter.syncs.values()), "host_syncs_in_model": model_syncs,
        "host_syncs_by_kind": {f"{p}/{k}": v for (p, k), v in sorted(counter.syncs.items())},
        "sync_sites": dict(counter.sync_sites.most_common()),
        "host_reads_not_syncs_on_gpu": dict(counter.host_reads),
        "host_to_device": sum(counter.host_to_device.values()),
        "top_ops": dict(counter.op_names.most_common(25)),
    }


def run_child(args_list):
    """Each count in a fresh process (no state shared between models)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"] + args_list,
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict, before: dict | None) -> str:
    head = "| model | batch | launched ops / step | host syncs in the model step | host-to-device creations |"
    sep = "|---|---|---|---|---|"
    if before:
        head = ("| model | batch | launched ops before → after | host syncs before → after "
                "| host-to-device before → after |")
    lines = [head, sep]
    for key, r in rows.items():
        b = (before or {}).get(key)
        label = LABELS[r["kind"]]
        if b:
            lines.append(f"| {label} | {r['batch']} | {b['ops']:,} → **{r['ops']:,}** | "
                         f"{b['host_syncs_in_model']} → **{r['host_syncs_in_model']}** | "
                         f"{b['host_to_device']} → {r['host_to_device']} |")
        else:
            lines.append(f"| {label} | {r['batch']} | {r['ops']:,} | {r['host_syncs_in_model']} | "
                         f"{r['host_to_device']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="2:256x384,32:160x256",
                        help="batch:HxW of the detector images (Mask R-CNN, 2DRCL) per batch size; the op "
                             "counts do not depend on the image size, the memory does (2DRCL at 32 x 256x384 "
                             "needs more than 16 GB on CPU)")
    parser.add_argument("--kinds", default="maskrcnn,drcl,moco,detco")
    parser.add_argument("--label", default=None, help="write step_ops_<label>.json and leave BENCHMARKS.md alone")
    parser.add_argument("--before", default=os.path.join(ROOT, "benchmarks", "results", "step_ops_before.json"),
                        help="the counts of the code before issue 13, for the before → after table")
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite the table from the last run's benchmarks/results/step_ops_<device>.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=384, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.child:
        print(json.dumps(count_step(args.kind, args.device, args.batch, args.height, args.width)))
        return

    from _report import RESULTS, environment, update_benchmarks_md, write_result

    sizes = {int(b): tuple(int(v) for v in hw.split("x")) for b, hw in (x.split(":") for x in args.sizes.split(","))}
    name = f"step_ops_{args.label or args.device}"
    if args.from_json:  # the table and BENCHMARKS.md section from the last run's counts
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            result = json.load(f)
        rows = result["rows"]
    else:
        rows = {}
        for batch, (h, w) in sizes.items():
            for kind in args.kinds.split(","):
                common = ["--device", args.device, "--kind", kind, "--batch", str(batch),
                          "--height", str(h), "--width", str(w)]
                rows[f"{kind}_b{batch}"] = r = run_child(common)
                print(f"{kind} batch {batch}: {r['ops']} ops, {r['host_syncs_in_model']} syncs in the model step, "
                      f"{r['host_to_device']} host-to-device", flush=True)
        result = {"device": args.device, "rows": rows, "goals_batch2": GOALS, "detector_sizes": args.sizes,
                  "env": environment()}
        write_result(name, result)
    before = None
    if args.label is None and os.path.exists(args.before):
        with open(args.before) as f:
            before = json.load(f)["rows"]
    text = table(rows, before)
    print(text)
    if args.label is None and args.device == "cpu":
        env = result["env"]
        met = {LABELS[k]: rows[f"{k}_b2"]["ops"] <= g for k, g in GOALS.items() if f"{k}_b2" in rows}
        update_benchmarks_md("step_ops_cpu", "\n".join([
            "## Launched ops and host syncs per training step (CPU counts, the GPU-side proxy)", "",
            "`python benchmarks/bench_step_ops.py` — one training step (forward, backward and 2DRCL's EMA "
            "update; the SGD step is counted apart, in the JSON), the second step of a fresh model, counted "
            "under a TorchDispatchMode; R-50 and the paper configs; Mask R-CNN and 2DRCL on "
            f"{' / '.join(f'{h}×{w} (batch {b})' for b, (h, w) in sizes.items())} images with 8 boxes each "
            "(the counts do not depend on the image size), MoCo v2 / DetCo on 224-px views and 2 × 9 64-px "
            f"patches; torch {env['torch']}, commit {env['commit']}. Before: the code before issue 13 "
            "(commit 5cfe367, `benchmarks/results/step_ops_before.json`).", "",
            text, "",
            "**Launched ops**: every aten op except views / aliases, allocations (`empty*`) and "
            "`torch.tensor(...)` creations. **Host syncs**, as they would be on a GPU: `.item()` / `int()` / "
            "`bool()` reads, ops whose output shape depends on values (`nonzero`, boolean indexing, "
            "`repeat_interleave` without `output_size`, `unique`), `.tolist()` / `.numpy()` and device-to-host "
            "copies; not counted: detectron2's `ImageList.from_tensors`, which reads CPU tensors of the image "
            "shapes on a GPU too (2 per call). Each sync's code location is in the JSON. **Host-to-device "
            "creations**: `torch.tensor(python data)` on the device (image ids, box counts, image sizes). "
            f"Goals at batch 2 (issue 13): MoCo v2 ≤ {GOALS['moco']:,}, DetCo ≤ {GOALS['detco']:,}, "
            f"2DRCL ≤ {GOALS['drcl']:,} ops ({'; '.join(f'{k}: ' + ('met' if v else 'missed') for k, v in met.items())}) "
            "and 0 host syncs in the model step.",
        ]))

if __name__ == "__main__":
    main()
