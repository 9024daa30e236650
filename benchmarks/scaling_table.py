#!/usr/bin/env python
"""Table of step time and peak memory vs batch size and image size from benchmarks/scaling.sh's results.

    bash benchmarks/scaling.sh cuda && python benchmarks/scaling_table.py gpu
"""
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import RESULTS, update_benchmarks_md  # noqa: E402


def main():
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"pretrain_step_{dev}_b*_maskrcnn_drcl.json"))):
        b, h, w = map(int, re.search(r"_b(\d+)_(\d+)x(\d+)_", path).groups())
        r = json.load(open(path))["rows"]
        rows.append((b, h, w, r["maskrcnn_fp32"], r["drcl_fp32"], json.load(open(path))["env"]))
    if not rows:
        sys.exit(f"no scaling results for {dev} in {RESULTS}: run benchmarks/scaling.sh first")
    rows.sort(key=lambda x: (x[0], x[1] * x[2]))
    env = rows[0][5]
    lines = [f"## Scaling with batch size and image size ({'GPU: ' + str(env['cuda']) if env['cuda'] else 'CPU'})", "",
             f"`bash benchmarks/scaling.sh {'cuda' if dev == 'gpu' else 'cpu'} && python benchmarks/scaling_table.py {dev}` — "
             "ResNet-50-FPN, fp32, median step time; peak memory is torch.cuda.max_memory_allocated on GPU, the process max RSS on CPU.", "",
             "| images / iter | image size | Mask R-CNN s / iter | 2DRCL s / iter | ratio | Mask R-CNN peak MiB | 2DRCL peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for b, h, w, m, d, _ in rows:
        lines.append(f"| {b} | {h}×{w} | {m['seconds_per_iter']:.3f} | {d['seconds_per_iter']:.3f} | "
                     f"{d['seconds_per_iter'] / m['seconds_per_iter']:.2f}× | {m['peak_memory_mib']:.0f} | "
                     f"{d['peak_memory_mib']:.0f} |")
    update_benchmarks_md(f"scaling_{dev}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
