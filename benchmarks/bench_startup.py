#!/usr/bin/env python
"""Start-up time at LVIS v1 scale: drcl_d2's train_net.py against detectron2's own LVIS path.

Writes an LVIS-format json of LVIS v1's size (100,170 images, 1,203 categories with a long-tailed
image count, ~1.27M polygon annotations; about 440 MB) and 19,809 val images, hard-linked image
files, then times from the start of the process to detectron2's "Starting training" line:

- detectron2: its DefaultTrainer (tools/train_net.py without evaluators) on the builtin
  `lvis_v1_train` (DETECTRON2_DATASETS pointing at the generated files);
- drcl_d2: `train_net.py` with the same config, the json given as DATASETS.LVIS_CUSTOM (parsed
  once, images checked to exist, checks before the model is built).

Runs alternate (detectron2, drcl_d2, ...) so that both see the same machine load; the ratio is of
the medians. With DATASETS.TEST set, drcl_d2 also checks the val json before training: its first
start parses it once, later starts read the metadata cache.

    python benchmarks/bench_startup.py [--repeats 2] [--work /tmp/drcl_bench_startup]

Goal: drcl_d2 / detectron2 <= 1.05 (same json, no test set).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import environment, update_benchmarks_md, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/LVISv1/mask_rcnn_R_50_FPN_2x_rfs.yaml")
# detectron2's tools/train_net.py, less its evaluators (no test set is evaluated here).
DETECTRON2_TRAIN_NET = """
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch

def main(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.train()

args = default_argument_parser().parse_args()
launch(main, args.num_gpus, args=(args,))
"""


def make_lvis_scale(root: str, num_train=100_170, num_val=19_809, num_categories=1203, annotations=1_270_000):
    """LVIS v1-shaped jsons under root/lvis and hard-linked images under root/coco (idempotent)."""
    lvis = os.path.join(root, "lvis")
    done = os.path.join(lvis, "done")
    if os.path.exists(done):
        return
    os.makedirs(lvis, exist_ok=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    # Images per category: LVIS v1's shape (337 rare 1-10, 461 common 11-100, 405 frequent > 100).
    counts = np.concatenate([rng.integers(1, 11, 337), rng.integers(11, 101, 461),
                             np.minimum(rng.pareto(1.0, 405) * 150 + 101, 30_000).astype(int)])
    freq = ["r"] * 337 + ["c"] * 461 + ["f"] * 405
    categories = [{"id": i + 1, "name": f"category_{i + 1}", "synset": f"c{i + 1}.n.01", "synonyms": [],
                   "def": "", "frequency": freq[i], "image_count": int(counts[i]), "instance_count": 0}
                  for i in range(num_categories)]
    seed_image = os.path.join(root, "seed.jpg")
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(seed_image)
    for split, num_images, first_id, num_anns in (("train", num_train, 1, annotations),
                                                  ("val", num_val, 10_000_000, annotations * num_val // num_train)):
        folder = os.path.join(root, "coco", f"{split}2017")
        os.makedirs(folder, exist_ok=True)
        images = []
        for k in range(num_images):
            image_id = first_id + k
            name = f"{image_id:012d}.jpg"
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                source = f"{seed_image}.{split}{k // 50_000}"  # a file system caps the links to one file
                if not os.path.exists(source):
                    shutil.copyfile(seed_image, source)
                os.link(source, path)
            images.append({"id": image_id, "height": 480, "width": 640, "license": 1, "flickr_url": "",
                           "coco_url": f"http://images.cocodataset.org/{split}2017/{name}", "date_captured": "",
                           "neg_category_ids": [], "not_exhaustive_category_ids": []})
        p = counts / counts.sum()
        cat = rng.choice(num_categories, size=num_anns, p=p) + 1
        img = rng.integers(0, num_images, num_anns) + first_id
        xy = rng.uniform(0, 400, (num_anns, 2))
        wh = rng.uniform(8, 200, (num_anns, 2))
        anns = []
        for a in range(num_anns):
            x, y = xy[a]
            w, h = wh[a]
            t = np.linspace(0, 2 * np.pi, 20, endpoint=False)  # a 20-point polygon inside the box
            poly = np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1).round(2).ravel()
            anns.append({"id": int(first_id + a), "image_id": int(img[a]), "category_id": int(cat[a]),
                         "bbox": [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)],
                         "area": round(float(np.pi * w * h / 4), 2), "segmentation": [poly.tolist()]})
        with open(os.path.join(lvis, f"lvis_v1_{split}.json"), "w") as f:
            json.dump({"info": {}, "licenses": [], "images": images, "annotations": anns,
                       "categories": categories}, f)
    open(done, "w").close()


def time_to_training(cmd: list[str], env: dict, out_dir: str) -> float:
    """Seconds from process start to the "Starting training" line; the process is then stopped."""
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if "Starting training" in line:
            seconds = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return seconds
    proc.wait()
    raise RuntimeError(f"{' '.join(cmd[:3])} ended (rc {proc.returncode}) before training:\n{''.join(tail)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "drcl_bench_startup"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    make_lvis_scale(args.work)
    train_json = os.path.join(args.work, "lvis", "lvis_v1_train.json")
    val_json = os.path.join(args.work, "lvis", "lvis_v1_val.json")
    coco = os.path.join(args.work, "coco")
    cache = os.path.join(args.work, "metadata_cache")
    env = dict(os.environ, DETECTRON2_DATASETS=args.work, DRCL_D2_CACHE=cache, OMP_NUM_THREADS="1")
    common = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "2", "SOLVER.IMS_PER_BATCH", "2"]
    reference = open(os.path.join(args.work, "detectron2_train_net.py"), "w")
    reference.write(DETECTRON2_TRAIN_NET)
    reference.close()

    def detectron2(test):
        # drcl_d2's configs name its LongTailROIHeads (StandardROIHeads with softmax CE, the default).
        return [sys.executable, reference.name, "--config-file", CONFIG, *common, "DATASETS.TEST", test,
                "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
                "OUTPUT_DIR", os.path.join(args.work, "out_d2")]

    def drcl(test):
        custom = [["big_train", train_json, coco]] + ([["big_val", val_json, coco]] if test != "()" else [])
        return [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG, *common,
                "DATASETS.LVIS_CUSTOM", repr(custom), "DATASETS.TRAIN", "('big_train',)", "DATASETS.TEST", test,
                "OUTPUT_DIR", os.path.join(args.work, "out_drcl")]

    times = {"detectron2": [], "drcl_d2": []}
    for r in range(args.repeats):
        for name, cmd in (("detectron2", detectron2("()")), ("drcl_d2", drcl("()"))):
            times[name].append(time_to_training(cmd, env, cmd[-1]))
            print(f"run {r}: {name} {times[name][-1]:.1f} s", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    with_test = {
        "detectron2, test set lvis_v1_val (builtin, not read at start)": time_to_training(
            detectron2("('lvis_v1_val',)"), env, os.path.join(args.work, "out_d2")),
        "drcl_d2, test set checked, first start (val json parsed once)": time_to_training(
            drcl("('big_val',)"), env, os.path.join(args.work, "out_drcl")),
        "drcl_d2, test set checked, later start (metadata cache)": time_to_training(
            drcl("('big_val',)"), env, os.path.join(args.work, "out_drcl")),
    }
    for k, v in with_test.items():
        print(f"{k}: {v:.1f} s", flush=True)
    ratio = statistics.median(times["drcl_d2"]) / statistics.median(times["detectron2"])
    env_info = environment()
    sizes = {"train_json_mb": round(os.path.getsize(train_json) / 2**20), "val_json_mb": round(os.path.getsize(val_json) / 2**20)}
    write_result("startup", {"seconds": times, "ratio": ratio, "with_test_set": with_test, "sizes": sizes,
                             "env": env_info})
    lines = ["## Start-up at LVIS v1 scale", "",
             f"`python benchmarks/bench_startup.py` — an LVIS v1-sized json ({sizes['train_json_mb']} MB: 100,170 "
             f"images, 1,203 categories, 1.27M polygons; val {sizes['val_json_mb']} MB), Mask R-CNN R50-FPN config, "
             f"CPU; seconds from process start to \"Starting training\", runs alternated; commit {env_info['commit']}.",
             "", "| run | seconds |", "|---|---|"]
    lines += [f"| {name}, no test set | {' / '.join(f'{t:.1f}' for t in ts)} |" for name, ts in times.items()]
    lines += [f"| {k} | {v:.1f} |" for k, v in with_test.items()]
    lines += ["", f"drcl_d2 / detectron2 (medians, no test set): **{ratio:.2f}×** (goal ≤ 1.05×)."]
    update_benchmarks_md("Start-up at LVIS v1 scale", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
