"""Embedded long-tailed dataset: a seeded generator of a small LVIS-v1-format detection dataset.

LVIS v1's layout and json schema at laptop size: ``root/{train2017,val2017}/<id:012d>.jpg``,
``root/lvis_v1_{train,val}.json`` and ``root/manifest.json`` (parameters + version, written last).
Category image counts follow LVIS v1's (``longtail_image_counts``), each category is a (colour,
texture, shape), an annotation is its object's visible part as polygons; same parameters, same bytes.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import time

import cv2
import numpy as np
from PIL import Image

from drcl_d2.utils import COMMON_MAX_IMAGES, atomic_write_json, frequency_group

logger = logging.getLogger(__name__)

__all__ = ["DATASET_VERSION", "PRESETS", "make_longtail_dataset", "longtail_image_counts", "category_specs", "main"]

# Bump when the generated content changes for the same parameters (invalidates old outputs).
DATASET_VERSION = 1

PRESETS: dict[str, dict] = {
    # Tests: small images, but >= 150 train images so that the r, c and f bands all exist.
    "tiny": dict(num_train_images=160, num_val_images=40, num_categories=12, image_size=(128, 160),
                 max_objects_per_image=5),
    "small": dict(num_train_images=400, num_val_images=100, num_categories=24, image_size=(256, 320),  # the demo
                  max_objects_per_image=6),
    "medium": dict(num_train_images=1500, num_val_images=300, num_categories=40, image_size=(256, 320),  # tables
                   max_objects_per_image=6),
}
# The long-tail table: medium with >= 10 val images per category, so that APr is measurable.
PRESETS["table"] = dict(PRESETS["medium"], val_min_images=10)

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ellipse", "diamond")
TEXTURES = ("plain", "striped", "checkered", "dotted")
TEXTURE_WORDS = {"plain": "a plain, evenly shaded", "striped": "a striped", "checkered": "a checkered",
                 "dotted": "a polka-dotted"}
COLOURS = (("red", (220, 38, 38)), ("green", (40, 175, 60)), ("blue", (40, 80, 225)),  # saturated: far from the greys
           ("yellow", (238, 212, 40)), ("magenta", (215, 45, 205)), ("cyan", (40, 205, 215)),
           ("orange", (248, 140, 28)), ("purple", (120, 45, 175)))
MAX_CATEGORIES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
_W = 0.32  # the cross's arm half-width
FIXED_SHAPES = {  # the other shapes' vertices lie on circles
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82,
    "cross": np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1], [-_W, 1],
                       [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]], dtype=np.float64),
    "diamond": np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]], dtype=np.float64),
}

TRAIN_JSON, VAL_JSON, MANIFEST = "lvis_v1_train.json", "lvis_v1_val.json", "manifest.json"
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}

# Occlusion rules: an earlier object must keep this fraction of its own area (and pixels) visible.
MIN_VISIBLE_FRACTION, MIN_VISIBLE_PIXELS = 0.4, 30
# Polygon simplification tolerance, in pixels of the 2x upsampled mask (0.3 px in the image).
POLY_EPSILON = 0.6


def category_specs(num_categories: int) -> list[dict]:
    """A unique (shape, colour, texture) per category: shape ``i % 8``, Latin-square colour
    ``(i + i // 8) % 8`` (neighbours differ in both), texture shifted every 64 categories."""
    if not 1 <= num_categories <= MAX_CATEGORIES:
        raise ValueError(f"num_categories must be in [1, {MAX_CATEGORIES}], got {num_categories}")
    specs = [(SHAPES[i % 8], *COLOURS[(i + i // 8) % 8], TEXTURES[(i + 2 * (i // 8) + i // 64) % 4])
             for i in range(num_categories)]
    return [dict(shape=sh, colour=c, rgb=rgb, texture=t, name=f"{c}_{t}_{sh}") for sh, c, rgb, t in specs]


def longtail_image_counts(num_categories: int, num_train_images: int) -> np.ndarray:
    """Target training images per category, ascending: LVIS v1's real image counts at evenly spaced
    quantiles, mapped by a log-log line from 1 image to ~50 % of the training images. LVIS's frequent
    band (> 100 images) needs >= 145 images: then the top rises to (at most) 80 % and, if fewer than
    two categories would be frequent, the line bends at a knee so that the two largest are."""
    from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

    C, N = int(num_categories), int(num_train_images)
    if C == 1:
        return np.array([max(1, int(round(0.5 * N)))])
    real = np.sort(np.asarray([c["image_count"] for c in LVIS_CATEGORY_IMAGE_COUNT], dtype=np.float64))
    picks = real[np.round(np.linspace(0, len(real) - 1, C)).astype(int)]
    can_have_frequent = N >= 145
    top = max(0.5 * N, min(0.8 * N, 115.0)) if can_have_frequent else 0.5 * N
    lp, lmax = np.log(picks), np.log(picks[-1])
    counts = np.exp(lp / lmax * np.log(top))
    k = C - (2 if C >= 6 else 1)  # the first index that must be frequent
    knee = COMMON_MAX_IMAGES + 0.5
    if can_have_frequent and C >= 3 and (counts > knee).sum() < C - k:
        lk = math.log(math.sqrt(picks[k - 1] * picks[k]))
        low = np.exp(lp / lk * math.log(knee))
        high = np.exp(math.log(knee) + (lp - lk) / (lmax - lk) * (math.log(top) - math.log(knee)))
        counts = np.where(lp <= lk, low, high)
        counts[k:] = np.maximum(counts[k:], COMMON_MAX_IMAGES + 1)
        counts[:k] = np.minimum(counts[:k], COMMON_MAX_IMAGES)
    return np.clip(np.round(counts), 1, N).astype(np.int64)


def _fit_counts(counts: np.ndarray, num_images: int, max_objects: int) -> np.ndarray:
    """Make the counts assignable: each in [1, num_images], every image non-empty, none over ``max_objects``."""
    counts, capacity = np.clip(counts.astype(np.int64), 1, num_images), num_images * max_objects
    if len(counts) > capacity:
        raise ValueError(f"{len(counts)} categories do not fit in {num_images} images of <= {max_objects} objects")
    limit = int(capacity * 0.85) if len(counts) <= capacity * 0.85 else capacity  # slack for _assign_categories
    while counts.sum() > limit:
        counts = np.maximum(1, np.floor(counts * 0.95)).astype(np.int64)
    deficit = num_images - int(counts.sum())
    if deficit > 0:  # every image needs an object: one more image each, largest categories first
        counts += deficit // len(counts)
        counts[np.argsort(-counts, kind="stable")[:deficit % len(counts)]] += 1
    return counts


def _assign_categories(counts: np.ndarray, num_images: int, max_objects: int, rng: np.random.Generator) -> list:
    """The categories of each image, category c in ``counts[c]`` of them: largest first, each takes the
    least loaded images below a random per-image soft capacity (so 1..max_objects vary)."""
    load, has = np.zeros(num_images, dtype=np.int64), np.zeros((len(counts), num_images), dtype=bool)
    soft_cap = rng.integers(1, max_objects + 1, size=num_images)
    for c in np.argsort(-counts, kind="stable"):
        t, avail = int(counts[c]), np.flatnonzero(load < max_objects)
        if len(avail) < t:
            raise ValueError(f"cannot place category {c} in {t} images: only {len(avail)} have room")
        chosen = avail[np.lexsort((rng.random(len(avail)), load[avail], load[avail] >= soft_cap[avail]))[:t]]
        has[c, chosen], load[chosen] = True, load[chosen] + 1
    return [np.flatnonzero(in_image).tolist() for in_image in has.T]  # ascending


def _unit_shape(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices of a shape of radius ~1 around the origin, randomly stretched and rotated (only a
    little where a rotation would make another class: a square at 45 degrees is a diamond)."""
    if shape in FIXED_SHAPES:
        pts = FIXED_SHAPES[shape]
    elif shape in ("circle", "ellipse"):
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(a), (1.0 if shape == "circle" else rng.uniform(0.45, 0.6)) * np.sin(a)], 1)
    elif shape == "triangle":
        a = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([np.cos(a), -np.sin(a)], 1)
    elif shape == "star":
        a, r = -np.pi / 2 + np.arange(10) * np.pi / 5, np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:  # hexagon
        a = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    if shape != "circle":  # aspect jitter; circles stay round to differ from ellipses
        pts = pts * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)])
    theta = rng.uniform(-0.3, 0.3) if shape in ("square", "diamond", "cross") else rng.uniform(0, 2 * np.pi)
    return pts @ np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]).T


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Varied, low-saturation background: gradient + smooth noise + grey clutter (float32)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = (rng.uniform(60, 195) + rng.normal(0, 14, 3) for _ in range(2))
    ang = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(ang) + yy * np.sin(ang)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    cell = int(rng.choice([8, 16, 32]))  # smooth large-scale noise: an upsampled coarse grid
    coarse = rng.normal(0, rng.uniform(4, 16), size=(h // cell + 2, w // cell + 2, 1))
    coarse = np.repeat(coarse, 3, axis=2) + rng.normal(0, 3, size=coarse.shape[:2] + (3,))
    img = img + cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.ascontiguousarray(img, dtype=np.float32)
    base, s = float(img.mean()), min(h, w)
    for _ in range(int(rng.integers(2, 9))):  # low-contrast grey lines, blobs and boxes as distractors
        g = base + rng.uniform(-28, 28)
        col = tuple(float(g + d) for d in rng.normal(0, 5, 3))
        kind = int(rng.integers(3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if kind == 0:
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, (x, y), p2, col, int(rng.integers(1, max(2, s // 40) + 1)))
        elif kind == 1:
            axes = (int(rng.integers(3, s // 5 + 4)), int(rng.integers(3, s // 5 + 4)))
            cv2.ellipse(img, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, col, -1)
        else:
            p2 = (x + int(rng.integers(4, s // 4 + 5)), y + int(rng.integers(4, s // 4 + 5)))
            cv2.rectangle(img, (x, y), p2, col, -1)
    return img


def _paint_object(img: np.ndarray, mask: np.ndarray, spec: dict, center: tuple, size: float,
                  rng: np.random.Generator) -> None:
    """Fill ``mask`` with the category's colour and texture, in place."""
    x0, y0, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    box = np.s_[y0:y0 + bh, x0:x0 + bw]
    yy, xx = np.mgrid[box].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    u = (xx - center[0]) * np.cos(ang) + (yy - center[1]) * np.sin(ang)
    v = -(xx - center[0]) * np.sin(ang) + (yy - center[1]) * np.cos(ang)
    period, tex = max(3.0, size * rng.uniform(0.2, 0.3)), spec["texture"]
    fu, fv = np.floor(u / period), np.floor(v / period)  # stripes and checks
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2  # dots
    pat = {"plain": np.zeros_like(u), "striped": fu % 2, "checkered": (fu + fv) % 2,
           "dotted": du * du + dv * dv < (0.3 * period) ** 2}[tex].astype(np.float32)
    primary = np.float32(spec["rgb"]) * rng.uniform(0.85, 1.08) + rng.normal(0, 6, 3).astype(np.float32)
    secondary = primary * 0.38  # same hue, darker: texture never changes the colour class
    shade = 1.0 + 0.18 * (u / max(size, 1.0))  # soft lighting gradient
    col = (primary[None, None] * (1 - pat[..., None]) + secondary[None, None] * pat[..., None]) * shade[..., None]
    img[box][mask[box]] = col[mask[box]]


def _occlude(objs: list[dict], mask: np.ndarray) -> list | None:
    """The earlier objects' visible masks once ``mask`` is drawn over them; None if one that it covers
    would keep too little visible or stop being one 8-connected piece without holes (one polygon)."""
    new_vis = []
    for o in objs:
        nv = o["vis"] & ~mask
        if (o["vis"] & mask).any():
            n_contours = len(cv2.findContours(nv.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0])
            if nv.sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * o["full_area"]) or n_contours != 1:
                return None
        new_vis.append(nv)
    return new_vis


def _render_image(h: int, w: int, required: list, n_extra: int, specs: list, rng: np.random.Generator) -> tuple:
    """A uint8 RGB image and its (category index, visible mask) pairs. The required categories get 48
    tries, then ``n_extra`` more of them 6 (or are skipped); shrinks by 20 % after every 8 rejections."""
    img, s = _background(h, w, rng), min(h, w)
    extra = [int(required[i]) for i in rng.integers(0, len(required), size=n_extra)] if n_extra else []
    order = [int(c) for c in rng.permutation(np.asarray(required, dtype=np.int64))] + extra
    objs: list[dict] = []
    for k, cat in enumerate(order):
        # Log-uniform size in [12 %, 45 %] of the short side: more small objects than big.
        size = float(np.exp(rng.uniform(np.log(0.12), np.log(0.45)))) * s
        for attempt in range(48 if k < len(required) else 6):
            if attempt and attempt % 8 == 0:
                size = max(6.0, size * 0.8)
            pts = _unit_shape(specs[cat]["shape"], rng) * (size / 2)
            cx, cy = rng.uniform(-pts.min(0), np.maximum(-pts.min(0), [w - 1, h - 1] - pts.max(0))).tolist()
            vertices = [np.round((pts + [cx, cy]) * 4).astype(np.int32)]  # 1/4-px vertices
            mask = cv2.fillPoly(np.zeros((h, w), np.uint8), vertices, 1, lineType=cv2.LINE_8, shift=2).astype(bool)
            new_vis = _occlude(objs, mask) if mask.sum() >= MIN_VISIBLE_PIXELS else None
            if new_vis is not None:
                break
        else:
            logger.debug("could not place an object of category %d (required: %s)", cat, k < len(required))
            continue
        for o, nv in zip(objs, new_vis):
            o["vis"] = nv
        _paint_object(img, mask, specs[cat], (cx, cy), size, rng)
        objs.append(dict(cat=cat, vis=mask, full_area=int(mask.sum())))
    img = img + rng.normal(0, 3.0, size=img.shape).astype(np.float32)  # sensor noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8), [(o["cat"], o["vis"]) for o in objs]


def _mask_to_annotation(mask: np.ndarray) -> dict | None:
    """Polygons, bbox [x, y, w, h] and area of a mask; None if too small or without a polygon. Contours
    are traced on the 2x upsampled mask, whose boundary sub-pixel centres lie 0.25 px inside the pixel
    edges: pycocotools rasterises the polygons back to (almost exactly) the mask."""
    up = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    polys = [cv2.approxPolyDP(c, POLY_EPSILON, True).reshape(-1, 2)
             for c in cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]]
    polys = [[float(v) for v in (p.astype(np.float64) / 2.0 + 0.25).ravel()] for p in polys if len(p) >= 3]
    area = int(mask.sum())
    if area < MIN_VISIBLE_PIXELS or not polys:
        return None
    return dict(segmentation=polys, area=float(area), bbox=[float(v) for v in cv2.boundingRect(mask.astype(np.uint8))])


def _generate_split(root: str, split: str, first_image_id: int, first_ann_id: int, counts: np.ndarray,
                    specs: list[dict], params: dict) -> tuple:
    """Render and save one split's images; return its LVIS image and annotation dicts."""
    (h, w), max_objects, seed = params["image_size"], params["max_objects_per_image"], params["seed"]
    split_key = 0 if split == "train" else 1
    rng = np.random.default_rng([seed, split_key, 7])
    members = _assign_categories(counts, params[f"num_{split}_images"], max_objects, rng)
    os.makedirs(os.path.join(root, SPLIT_DIRS[split]), exist_ok=True)
    images, annotations = [], []
    for i, required in enumerate(members):
        image_id, rng = first_image_id + i, np.random.default_rng([seed, split_key, 1000 + i])
        pixels, objs = _render_image(h, w, required, int(rng.binomial(max_objects - len(required), 0.3)), specs, rng)
        present = set()
        for cat, vis in objs:
            ann = _mask_to_annotation(vis)
            if ann is None:  # too little visible to annotate
                continue
            present.add(cat)
            annotations.append(dict(id=first_ann_id + len(annotations), image_id=image_id, category_id=cat + 1, **ann))
        # Federated labels: every absent category is a verified negative here; LVIS-like, list a subset.
        absent = np.array([c for c in range(len(specs)) if c not in present], dtype=np.int64)
        k = int(rng.integers(math.ceil(0.3 * len(absent)), math.ceil(0.7 * len(absent)) + 1)) if len(absent) else 0
        neg = sorted(int(c) + 1 for c in rng.choice(absent, size=k, replace=False)) if k else []
        not_exhaustive = [int(rng.choice(sorted(present))) + 1] if present and rng.random() < 0.05 else []
        file_name = f"{SPLIT_DIRS[split]}/{image_id:012d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, file_name), format="JPEG", quality=90)
        images.append(dict(id=image_id, width=w, height=h, file_name=file_name,
                           coco_url=f"http://images.cocodataset.org/{file_name}", license=1,
                           date_captured="2024-01-01 00:00:00", neg_category_ids=neg,
                           not_exhaustive_category_ids=not_exhaustive))
    return images, annotations


def make_longtail_dataset(root: str, *, num_train_images: int = 400, num_val_images: int = 100,
                          num_categories: int = 24, image_size: tuple = (256, 320), max_objects_per_image: int = 6,
                          seed: int = 0, val_min_images: int | None = None, overwrite: bool = False) -> dict:
    """Generate (or reuse) the embedded long-tailed LVIS-v1-format dataset under ``root``.

    ``image_size`` is (height, width); ``val_min_images``: val images per category at least (None: 1-3);
    ``overwrite``: regenerate over a dataset made with other parameters (else a ValueError). Returns
    ``train_json``, ``val_json``, ``image_root`` (= ``root``), ``categories`` (count), ``manifest``,
    ``num_train_images``, ``num_val_images``, ``frequency_counts`` ({"r", "c", "f"} -> categories),
    ``image_counts`` (train images per category id 1..C), ``generated`` (False: an existing dataset reused).
    """
    root, (h, w) = os.fspath(root), (int(image_size[0]), int(image_size[1]))
    params = dict(num_train_images=int(num_train_images), num_val_images=int(num_val_images),
                  num_categories=int(num_categories), image_size=[h, w],
                  max_objects_per_image=int(max_objects_per_image), seed=int(seed))
    if val_min_images is not None:  # only when set: datasets made before the option keep their manifest
        params["val_min_images"] = int(val_min_images)
    if min(num_train_images, num_val_images, max_objects_per_image) < 1 or min(h, w) < 32:
        raise ValueError(f"need >= 1 train and val image and object per image, and image sides >= 32: {params}")
    specs = category_specs(num_categories)
    train_json, val_json, manifest_path = (os.path.join(root, n) for n in (TRAIN_JSON, VAL_JSON, MANIFEST))
    result = dict(train_json=train_json, val_json=val_json, image_root=root, categories=int(num_categories),
                  manifest=manifest_path, num_train_images=int(num_train_images), num_val_images=int(num_val_images))
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except ValueError as e:  # incl. JSON and Unicode errors: written last and atomically here, so damaged
            if not overwrite:
                raise ValueError(f"{manifest_path} is not a valid manifest ({e}); pass overwrite=True "
                                 "(CLI: --overwrite) to regenerate the dataset, or choose another directory") from e
            manifest = {}
        same = manifest.get("params") == params and manifest.get("version") == DATASET_VERSION
        images = [os.path.join(root, SPLIT_DIRS["train" if i <= num_train_images else "val"], f"{i:012d}.jpg")
                  for i in range(1, num_train_images + num_val_images + 1)]
        if same and all(map(os.path.exists, [train_json, val_json] + images)):
            logger.info("Reusing the long-tailed dataset in %s (same parameters, all files present)", root)
            return dict(result, **manifest.get("summary", {}), generated=False)
        if not same and not overwrite:
            raise ValueError(f"{root} already holds a dataset generated with different parameters (found version "
                             f"{manifest.get('version')} {manifest.get('params')}, requested version {DATASET_VERSION} "
                             f"{params}); pass overwrite=True (CLI: --overwrite) or choose another directory")
        os.remove(manifest_path)  # first: an interrupted regeneration must not look complete
        for d in SPLIT_DIRS.values():  # this generator's old images (only its own 12-digit names)
            for path in glob.glob(os.path.join(root, d, "[0-9]" * 12 + ".jpg")):
                os.remove(path)
        logger.info("Regenerating the long-tailed dataset in %s", root)

    t0 = time.perf_counter()
    # The r/c/f band of each category index is fixed per category count: every seed has the same tail.
    perm = np.random.default_rng(7919 + num_categories).permutation(num_categories)  # index perm[j]: j-th smallest
    train_counts = _fit_counts(longtail_image_counts(num_categories, num_train_images)[np.argsort(perm)],
                               num_train_images, max_objects_per_image)
    # Val: train proportions, with a floor so that every category (rare too) is evaluable.
    floor = val_min_images if val_min_images is not None else int(np.clip((2 * num_val_images) // num_categories, 1, 3))
    val_counts = np.round(train_counts * (num_val_images / num_train_images)).astype(np.int64)
    val_counts = _fit_counts(np.clip(val_counts, floor, num_val_images), num_val_images, max_objects_per_image)
    train = _generate_split(root, "train", 1, 1, train_counts, specs, params)
    val = _generate_split(root, "val", num_train_images + 1, len(train[1]) + 1, val_counts, specs, params)

    # Categories: counts and frequency from the generated train split.
    cat_images, cat_instances = [set() for _ in specs], [0] * len(specs)
    for a in train[1]:
        cat_images[a["category_id"] - 1].add(a["image_id"])
        cat_instances[a["category_id"] - 1] += 1
    categories = [{"id": i + 1, "name": c["name"], "synset": f"{c['name']}.n.01", "synonyms": [c["name"]],
                   "def": f"{TEXTURE_WORDS[c['texture']]} {c['colour']} {c['shape']} drawn on a cluttered background",
                   "frequency": frequency_group(len(ims)) if ims else "r", "image_count": len(ims), "instance_count": n}
                  for i, (c, ims, n) in enumerate(zip(specs, cat_images, cat_instances))]
    info = dict(description="drcl_d2 embedded long-tailed dataset (synthetic, LVIS v1 format)", url="",
                version=str(DATASET_VERSION), year=2024, contributor="drcl_d2 synthetic generator",
                date_created="2024-01-01")
    licenses = [dict(id=1, name="Synthetic data, no restrictions", url="")]
    for path, (images, anns) in ((train_json, train), (val_json, val)):
        atomic_write_json(dict(info=info, licenses=licenses, images=images, annotations=anns, categories=categories),
                          path, separators=(",", ":"))
    summary = {"frequency_counts": {b: sum(c["frequency"] == b for c in categories) for b in "rcf"},
               "image_counts": [c["image_count"] for c in categories]}
    atomic_write_json(dict(version=DATASET_VERSION, params=params, summary=summary), manifest_path,
                      separators=(",", ":"))
    logger.info("Generated the long-tailed dataset in %s in %.1fs: %d train images (%d annotations), %d val (%d), "
                "categories %s", root, time.perf_counter() - t0, num_train_images, len(train[1]), num_val_images,
                len(val[1]), summary["frequency_counts"])
    return dict(result, **summary, generated=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m drcl_d2.data.synthetic OUTPUT_DIR [--preset ...] [overrides]``."""
    parser = argparse.ArgumentParser(
        prog="drcl-make-dataset", description="Write the embedded long-tailed dataset (LVIS v1 format) to OUTPUT_DIR.")
    parser.add_argument("output_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="size preset (default: small); the options below override it")
    for flag, key in (("--train-images", "num_train_images"), ("--val-images", "num_val_images"),
                      ("--categories", "num_categories"), ("--seed", "seed")):
        parser.add_argument(flag, type=int, dest=key, metavar="N")
    parser.add_argument("--overwrite", action="store_true", help="regenerate over a dataset with other parameters")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = make_longtail_dataset(args.pop("output_dir"), **dict(
            PRESETS[args.pop("preset")], **{k: v for k, v in args.items() if v is not None}))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("train json: {train_json}\nval json:   {val_json}\nimage root: {image_root}\ncategories: {categories} "
          "(rare {r}, common {c}, frequent {f})".format(**out, **out["frequency_counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
