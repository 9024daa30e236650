"""Validate an LVIS-format dataset fully, decoding every image: every problem, with its id.

    python -m drcl_d2.tools.check_dataset datasets/lvis/lvis_v1_train.json datasets/coco
    python -m drcl_d2.tools.check_dataset VAL_JSON IMAGE_ROOT --num-classes 1203 --mask-format polygon

Training checks what it can without decoding images and skips an unusable image when it meets it
(drcl_d2.data.checks, drcl_d2.data.mappers). This is the opt-in full pass (slow at LVIS scale;
--workers spreads it over processes): it reads every image as training does (detectron2's
read_image: EXIF orientation, conversion to 8 bits) and reports every problem on a line
(:func:`check_json`, :func:`check_image`): errors, which training stops on or skips, and warnings
(what only LVIS evaluation needs, images that are not 8 bits per channel).

Exit status: 0 when there is no error, 1 when there is one, 2 when the json cannot be read.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Sequence

from detectron2.data.detection_utils import read_image
from PIL import Image
from tqdm import tqdm

from ..data.datasets import FREQUENCIES, _outside_image, _valid_box, _valid_segmentation, image_path, read_json_file

__all__ = ["Problem", "check_json", "check_image", "check_dataset", "main"]

# PIL modes that detectron2's conversion to 8-bit RGB/BGR clips (values above 255 become 255).
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    kind: str      # a short name, counted in the summary
    where: str     # "image id 3 (path)", "annotation id 7 (image id 3)", "category id 10", "json"
    detail: str

    def __str__(self) -> str:
        return f"{self.severity:7s} {self.kind}: {self.where}: {self.detail}"


def check_json(data: dict, image_root: str, *, path_rule: str = "auto", mask_format: str | None = None,
               num_classes: int | None = None) -> tuple[list[Problem], list[tuple]]:
    """Every problem of the json itself, and the images to decode: (image id, path, height, width)."""
    problems: list[Problem] = []

    def add(severity, kind, where, detail):
        problems.append(Problem(severity, kind, where, detail))

    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            add("error", "json", "json", f"missing top-level list {key!r}")
    if problems:
        return problems, []

    def first_time(seen: set, entry: dict, what: str, where: str, consequence: str = "") -> bool:
        if entry.get("id") in seen:
            add("error", f"duplicate {what} id", where, "listed more than once" + consequence)
            return False
        seen.add(entry.get("id"))
        return True

    category_ids = set()
    for c in data["categories"]:
        where = f"category id {c.get('id')} ({c.get('name', '?')})"
        first_time(category_ids, c, "category", where, ": class names would shift")
        if c.get("frequency") not in FREQUENCIES:
            add("warning", "frequency", where, f"frequency {c.get('frequency')!r} is not 'r', 'c' or 'f' "
                "(LVIS evaluation needs it)")
    if num_classes is not None and num_classes != len(category_ids):
        add("error", "num classes", "json", f"{len(category_ids)} categories, but --num-classes {num_classes} "
            "(MODEL.ROI_HEADS.NUM_CLASSES must equal the category count)")

    images, image_ids, to_decode = {}, set(), []
    for img in data["images"]:
        where = f"image id {img.get('id')}"
        if any(k not in img for k in ("id", "height", "width")):
            add("error", "image entry", where, "lacks id, height or width")
            continue
        if not first_time(image_ids, img, "image", where):
            continue
        images[img["id"]] = img
        try:
            to_decode.append((img["id"], image_path(image_root, img, path_rule), img["height"], img["width"]))
        except ValueError as e:
            add("error", "image path", where, str(e))

    ann_ids = set()
    for ann in data["annotations"]:
        where = f"annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        first_time(ann_ids, ann, "annotation", where)
        img = images.get(ann.get("image_id"))
        if img is None:
            add("error", "unknown image", where, "its image id is not in 'images'")
        if ann.get("category_id") not in category_ids:
            add("error", "unknown category", where, f"category_id {ann.get('category_id')} is not in 'categories'")
        if not _valid_box(ann.get("bbox")):
            add("error", "degenerate box", where, f"bbox {ann.get('bbox')} (skipped at load)")
        elif img is not None and _outside_image(ann["bbox"], img):
            add("error", "box outside image", where, f"bbox {ann['bbox']} lies outside the {img['width']}x"
                f"{img['height']} image (skipped at load)")
        segm = ann.get("segmentation")
        if segm is None:
            if mask_format is not None:
                add("error", "no segmentation", where, "no 'segmentation' (masks are trained)")
        elif not _valid_segmentation(segm):
            add("error", "invalid polygon", where, "a polygon with < 3 points or odd length (skipped at load)")
        elif mask_format == "polygon" and isinstance(segm, dict):
            add("error", "rle under polygon", where, "RLE segmentation needs INPUT.MASK_FORMAT bitmask")
        if "area" not in ann:
            add("warning", "no area", where, "no 'area' (LVIS evaluation needs it)")
    return problems, to_decode


def check_image(item: tuple) -> list[Problem]:
    """Decode one image as training does; its problems (missing, unreadable, size, constant, depth)."""
    image_id, path, height, width = item
    where = f"image id {image_id} ({path})"
    if not os.path.isfile(path):
        return [Problem("error", "missing file", where, "no such file")]
    try:
        with Image.open(path) as im:
            mode = im.mode
        image = read_image(path, format="BGR")
    except Exception as e:  # any decoder failure is this image's problem, reported with its id
        return [Problem("error", "unreadable", where, f"{type(e).__name__}: {e}")]
    out = []
    if (image.shape[0], image.shape[1]) != (height, width):
        out.append(Problem("error", "size mismatch", where, f"json height x width {height}x{width}, decoded "
                           f"{image.shape[0]}x{image.shape[1]}"))
    if image.size and image.min() == image.max():
        out.append(Problem("error", "constant image", where, f"decodes to one value ({int(image.flat[0])}); PIL "
                           f"mode {mode!r}"))
    elif mode in WIDE_MODES:
        out.append(Problem("warning", "not 8-bit", where, f"PIL mode {mode!r}: values above 255 are clipped"))
    return out


def check_dataset(json_file: str, image_root: str, *, path_rule: str = "auto", mask_format: str | None = None,
                  num_classes: int | None = None, decode: bool = True, workers: int = 1,
                  progress: bool = True) -> list[Problem]:
    """All problems of the json and, with `decode`, of every image (in parallel over `workers`)."""
    data = read_json_file(json_file)
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a JSON object, found {type(data).__name__}")
    problems, to_decode = check_json(data, image_root, path_rule=path_rule, mask_format=mask_format,
                                     num_classes=num_classes)
    if not decode or not to_decode:
        return problems
    bar = dict(total=len(to_decode), desc="decoding images", unit="img", disable=not progress, file=sys.stderr)
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        found = pool.imap(check_image, to_decode, chunksize=16) if pool else map(check_image, to_decode)
        problems.extend(p for image_problems in tqdm(found, **bar) for p in image_problems)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drcl_d2.tools.check_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("json_file", help="LVIS-format json")
    parser.add_argument("image_root", help="folder the images' file_name (or coco_url folder) is relative to")
    parser.add_argument("--path-rule", default="auto", choices=("auto", "file_name", "coco_url"),
                        help="as DATASETS.LVIS_CUSTOM_PATH_RULE")
    parser.add_argument("--mask-format", choices=("polygon", "bitmask"), default=None,
                        help="INPUT.MASK_FORMAT when masks are trained (checks segmentation); omit for boxes only")
    parser.add_argument("--num-classes", type=int, default=None, help="MODEL.ROI_HEADS.NUM_CLASSES to compare")
    parser.add_argument("--no-decode", action="store_true", help="check the json only (seconds, not hours)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    args = parser.parse_args(argv)
    try:
        problems = check_dataset(args.json_file, args.image_root, path_rule=args.path_rule,
                                 mask_format=args.mask_format, num_classes=args.num_classes,
                                 decode=not args.no_decode, workers=args.workers, progress=sys.stderr.isatty())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    counts = Counter((p.severity, p.kind) for p in problems)
    errors = sum(n for (severity, _), n in counts.items() if severity == "error")
    summary = ", ".join(f"{n} {kind}" for (_, kind), n in sorted(counts.items())) or "no problems"
    print(f"{args.json_file}: {errors} error(s), {len(problems) - errors} warning(s): {summary}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
