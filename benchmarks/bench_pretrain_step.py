#!/usr/bin/env python
"""One 2DRCL pretraining iteration vs one stock detectron2 Mask R-CNN R50-FPN training iteration.

Same images, same resolution, same device, ResNet-50-FPN in both (FrozenBN, as fine-tuning and the
paper's torchvision-initialised pretraining use). An iteration is forward + backward + SGD step (+ the
EMA target update for 2DRCL). Reported: seconds per iteration (median of the timed iterations),
images/s, peak memory, fvcore forward FLOPs, and a per-term breakdown of 2DRCL (the cost that switching
each term off removes).

    python benchmarks/bench_pretrain_step.py                      # CPU, writes pretrain_step_cpu.json
    python benchmarks/bench_pretrain_step.py --device cuda --amp  # GPU rows (with and without AMP)

Goal (issue): a 2DRCL iteration <= 2.0x the stock iteration. Where it is missed, the FLOPs and the
breakdown say where the time goes; no view, term or default is changed to meet it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 2.0
DETCO_GOAL = 1.6
LABELS = {"maskrcnn": "Mask R-CNN R50-FPN (detectron2)", "drcl": "2DRCL (all terms)",
          "moco": "MoCo v2 R-50 (224 views)", "detco": "DetCo R-50 (224 views + 2x9 patches)"}
TERMS = ("HCL", "LCL", "AR", "SR", "RPN")


def build(kind: str, device: str, off: str | None = None, compile_step: bool = False):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import drcl_d2.modeling  # noqa: F401
    from drcl_d2 import add_drcl_config

    cfg = add_drcl_config(get_cfg())
    if kind == "maskrcnn":
        cfg.merge_from_file(os.path.join(ROOT, "configs/LVISv1/mask_rcnn_R_50_FPN_2x_rfs.yaml"))
    elif kind in ("moco", "detco"):
        cfg.merge_from_file(os.path.join(ROOT, f"configs/pretrain/{'moco_v2' if kind == 'moco' else 'detco'}_R_50_200ep.yaml"))
    else:
        cfg.merge_from_file(os.path.join(ROOT, "configs/pretrain/Base-DRCL.yaml"))
        if off:
            setattr(cfg.MODEL.DRCL, f"{off}_WEIGHT", 0.0)
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", device
    torch.manual_seed(0)
    model = build_model(cfg)
    if hasattr(model, "init_target"):
        model.init_target()
    if compile_step:  # PRETRAIN.COMPILE (GPU; eager with a warning elsewhere)
        from drcl_d2.engine.pretrain import compile_pretraining_step

        compile_pretraining_step(model)
    model.train()
    return model


def make_inputs(kind: str, batch: int, h: int, w: int):
    """The same random images and 8 boxes per image for both models."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    if kind in ("moco", "detco"):  # MoCo v2 / DetCo inputs at the paper's sizes (224 views, 9 x 64 patches)
        for i in range(batch):
            views = torch.randint(0, 256, (2, 3, 224, 224), generator=g, dtype=torch.uint8)
            patches = torch.randint(0, 256, (2, 9, 3, 64, 64), generator=g, dtype=torch.uint8)
            out.append({"image_id": i, "view_q": views[0], "view_k": views[1],
                        "patches_q": patches[0], "patches_k": patches[1]})
        return out
    for _ in range(batch):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 32 + torch.rand(8, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        if kind == "maskrcnn":
            inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.randint(0, 1203, (8,), generator=g))
            masks = torch.zeros(8, h, w, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
            out.append({"image": img, "instances": inst, "height": h, "width": w})
        else:
            out.append({"image_id": len(out), "image_v1": img, "image_v2": img.flip(-1).clone(),
                        "boxes_v1": boxes, "boxes_v2": boxes.clone()})
    return out


def time_iterations(kind, device, batch, h, w, iters, warmup, amp=False, off=None, compile_step=False):
    from detectron2.utils.events import EventStorage

    model = build(kind, device, off, compile_step and kind != "maskrcnn")
    inputs = make_inputs(kind, batch, h, w)
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the optimizer does all its arithmetic but the randomly initialised weights (no ImageNet
    # statistics in FrozenBN) cannot drift into overflow over the timed iterations.
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with EventStorage(0) as storage:
        for it in range(warmup + iters):
            storage.iter = it
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
                losses = model(inputs)
            loss = sum(losses.values())
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if hasattr(model, "update_target"):
                model.update_target(it)
            if device == "cuda":
                torch.cuda.synchronize()
            if it >= warmup:
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds_per_iter": statistics.median(times), "all_seconds": times,
            "images_per_second": batch / statistics.median(times), "peak_memory_mib": peak,
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "process max RSS"}


def forward_flops(kind, batch, h, w):
    """FLOPs of one training-mode forward and of forward+backward, in GFLOPs (multiply-add = 2).

    Counted by torch.utils.flop_counter.FlopCounterMode, which follows the real dispatch; fvcore's
    jit trace cannot follow 2DRCL's data-dependent shapes (box counts, valid regions).
    """
    from detectron2.utils.events import EventStorage
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind, "cpu")
    inputs = make_inputs(kind, batch, h, w)
    with EventStorage(0):
        with FlopCounterMode(display=False) as fwd:
            loss = sum(model(inputs).values())
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    return {"forward": fwd.get_total_flops() / 1e9, "forward_backward": (fwd.get_total_flops() + bwd.get_total_flops()) / 1e9}


def run_child(args_list):
    """Each measurement in a fresh process, so peak memory is that configuration's own."""
    out = subprocess.run([sys.executable, __file__, "--child"] + args_list, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per iteration (per GPU)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--amp", action="store_true", help="also measure with autocast fp16 (GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="PRETRAIN.COMPILE: time the pretraining models with their compiled step (GPU)")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--kinds", default="maskrcnn,drcl,moco,detco",
                        help="which models to time (the ratios need their pairs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--off", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--amp-on", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    h = args.height or (800 if gpu else 384)
    w = args.width or (1216 if gpu else 512)
    iters = args.iters or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    if args.child:
        if args.flops:
            print(json.dumps(forward_flops(args.kind, args.batch, h, w)))
        else:
            print(json.dumps(time_iterations(args.kind, args.device, args.batch, h, w, iters, warmup,
                                             amp=args.amp_on, off=args.off, compile_step=args.compile)))
        return

    from _report import environment, update_benchmarks_md, write_result

    common = ["--device", args.device, "--batch", str(args.batch), "--height", str(h), "--width", str(w),
              "--iters", str(iters), "--warmup", str(warmup)] + (["--compile"] if args.compile else [])
    kinds = args.kinds.split(",")
    rows = {}
    for amp in ([False, True] if args.amp else [False]):
        tag = "amp" if amp else "fp32"
        for kind in kinds:
            rows[f"{kind}_{tag}"] = run_child(common + ["--kind", kind] + (["--amp-on"] if amp else []))
            print(kind, tag, f"{rows[f'{kind}_{tag}']['seconds_per_iter']:.3f} s/iter", flush=True)
    breakdown = {}
    if not args.no_breakdown and "drcl" in kinds:
        full = rows["drcl_fp32"]["seconds_per_iter"]
        for term in TERMS:
            t = run_child(common + ["--kind", "drcl", "--off", term])["seconds_per_iter"]
            breakdown[term] = {"seconds_without": t, "seconds_of_term": full - t, "share": (full - t) / full}
            print(f"without {term}: {t:.3f} s", flush=True)
    flops = {}
    for kind in ([] if args.no_flops else kinds):
        flops[kind] = run_child(["--batch", str(args.batch), "--height", str(h), "--width", str(w),
                                 "--kind", kind, "--flops"])
    def time_ratio(a, b):
        return rows[f"{a}_fp32"]["seconds_per_iter"] / rows[f"{b}_fp32"]["seconds_per_iter"] \
            if f"{a}_fp32" in rows and f"{b}_fp32" in rows else float("nan")

    def flop_ratio(a, b):
        return flops[a]["forward_backward"] / flops[b]["forward_backward"] if a in flops and b in flops else float("nan")

    ratio, detco_ratio = time_ratio("drcl", "maskrcnn"), time_ratio("detco", "moco")
    result = {"device": args.device, "batch": args.batch, "height": h, "width": w, "iters": iters,
              "warmup": warmup, "rows": rows, "ratio_drcl_over_maskrcnn": ratio, "goal": GOAL,
              "goal_met": ratio <= GOAL, "ratio_detco_over_moco": detco_ratio, "goal_detco": DETCO_GOAL,
              "goal_detco_met": detco_ratio <= DETCO_GOAL, "breakdown": breakdown, "forward_gflops": flops, "env": environment()}
    name = "pretrain_step_" + ("gpu" if gpu else "cpu") + ("_compiled" if args.compile else "")
    if args.batch != 2 or args.height or args.width or args.kinds != parser.get_default("kinds"):
        name += f"_b{args.batch}_{h}x{w}_" + "_".join(kinds)
    write_result(name, result)

    env = result["env"]
    compiled = " --compile" if args.compile else ""
    lines = [f"## Pretraining steps: 2DRCL vs stock Mask R-CNN, DetCo vs MoCo v2 ({'GPU: ' + str(env['cuda']) if gpu else 'CPU'})"
             + (", PRETRAIN.COMPILE" if args.compile else ""), "",
             f"`python benchmarks/bench_pretrain_step.py{' --device cuda --amp' if gpu else ''}{compiled}` — ResNet-50-FPN, "
             f"batch {args.batch}, {h}×{w} images, median of {iters} iterations after {warmup} warm-up; "
             f"{env['cpu_count']} CPU cores, torch {env['torch']}, commit {env['commit']}.", "",
             "| model | precision | s / iter | images / s | peak memory (MiB) |", "|---|---|---|---|---|"]
    lines[-2] = "| model | precision | s / iter | images / s | peak memory (MiB) | GFLOPs fwd / fwd+bwd |"
    lines[-1] = "|---|---|---|---|---|---|"
    for key, row in rows.items():
        kind, tag = key.split("_")
        f = flops.get(kind)
        f_text = f"{f['forward']:.0f} / {f['forward_backward']:.0f}" if f else "—"
        lines.append(f"| {LABELS[kind]} | {tag} | {row['seconds_per_iter']:.3f} | {row['images_per_second']:.2f} | "
                     f"{row['peak_memory_mib']:.0f} | {f_text} |")
    lines += ["", f"**2DRCL / Mask R-CNN (fp32): {ratio:.2f}×** in time (goal ≤ {GOAL:.1f}×: "
              f"{'met' if ratio <= GOAL else 'missed'}), "
              f"{flop_ratio('drcl', 'maskrcnn'):.2f}× in FLOPs. "
              f"**DetCo / MoCo v2 (fp32): {detco_ratio:.2f}×** in time (goal ≤ {DETCO_GOAL:.1f}×: "
              f"{'met' if detco_ratio <= DETCO_GOAL else 'missed'}), "
              f"{flop_ratio('detco', 'moco'):.2f}× in FLOPs. "
              f"MoCo v2 / DetCo rows use their own 224-px inputs (batch {args.batch}). Peak memory is "
              f"{next(iter(rows.values()))['peak_memory_kind']}; FLOPs from torch's FlopCounterMode (multiply-add = 2)."]
    if breakdown:
        lines += ["", "| 2DRCL term | s / iter it costs | share of the iteration |", "|---|---|---|"]
        for term, b in breakdown.items():
            lines.append(f"| {term} | {b['seconds_of_term']:.3f} | {100 * b['share']:.0f} % |")
        spread = statistics.pstdev(rows["drcl_fp32"]["all_seconds"])
        lines.append(f"\nA term's cost is the full iteration minus the iteration with that term off; the "
                     f"timed iterations of the full run spread by ±{spread:.3f} s (std), so smaller or "
                     "negative differences are noise" + (" (a launch-bound GPU at batch 2 shows this)." if gpu else "."))
    table = "\n".join(lines)
    if args.kinds == parser.get_default("kinds") or args.kinds == "moco,detco":
        update_benchmarks_md(name, table)  # scaling points go into scaling_table.py's one table instead
    print(table)


if __name__ == "__main__":
    main()
