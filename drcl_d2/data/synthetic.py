"""Embedded long-tailed dataset: a seeded generator of a small LVIS-v1-format detection dataset.

A stand-in for LVIS v1 (whose COCO images take ~25 GB) with the same layout and json schema, so the
whole pipeline runs end to end on a laptop and in tests: ``root/{train2017,val2017}/<id:012d>.jpg``,
``root/lvis_v1_{train,val}.json`` and ``root/manifest.json`` (parameters + version, written last).

* **Long tail.** Category training-image counts are LVIS v1's real counts (detectron2's
  ``LVIS_CATEGORY_IMAGE_COUNT``) at evenly spaced quantiles, mapped in log-log space onto
  ``1 .. ~0.5 * num_train_images``; the r / c / f labels use LVIS's thresholds on the actual counts,
  and from 145 training images the map is bent so that all three bands exist.
* **Learnable objects.** Every category is a distinct (colour, texture, shape) triple such as
  ``red_striped_star``, varied in scale, rotation, aspect and brightness, on varied backgrounds,
  and possibly occluded by objects drawn later.
* **Exact masks.** An annotation is the object's *visible* part. Placements that would hide too much
  of an earlier object, split it or punch a hole in it (polygons cannot express holes) are drawn
  again, so image counts stay on target; polygons are traced on a 2x upsampled mask so that
  pycocotools rasterises them back to the mask.
* **Deterministic.** Everything derives from ``numpy.random.default_rng`` streams keyed on the seed
  (one per image): same parameters -> same bytes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from drcl_d2.utils import COMMON_MAX_IMAGES, atomic_write_json, frequency_group

logger = logging.getLogger(__name__)

__all__ = ["DATASET_VERSION", "PRESETS", "make_longtail_dataset", "longtail_image_counts", "category_specs", "main"]

# Bump when the generated content changes for the same parameters (invalidates old outputs).
DATASET_VERSION = 1

PRESETS: Dict[str, Dict[str, Any]] = {
    # Tests: small images, but >= 150 train images so that the r, c and f bands all exist.
    "tiny": dict(num_train_images=160, num_val_images=40, num_categories=12,
                 image_size=(128, 160), max_objects_per_image=5),
    # Demo.
    "small": dict(num_train_images=400, num_val_images=100, num_categories=24,
                  image_size=(256, 320), max_objects_per_image=6),
    # Result tables.
    "medium": dict(num_train_images=1500, num_val_images=300, num_categories=40,
                   image_size=(256, 320), max_objects_per_image=6),
    # The long-tail table: the medium set with >= 10 val images per category, so the 14 rare
    # categories have about 140 val instances (medium: 42) and APr is measurable.
    "table": dict(num_train_images=1500, num_val_images=300, num_categories=40,
                  image_size=(256, 320), max_objects_per_image=6, val_min_images=10),
}

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ellipse", "diamond")
TEXTURES = ("plain", "striped", "checkered", "dotted")
TEXTURE_WORDS = {"plain": "a plain, evenly shaded", "striped": "a striped", "checkered": "a checkered",
                 "dotted": "a polka-dotted"}
# Saturated hues, far from the grey-ish backgrounds.
COLOURS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("red", (220, 38, 38)), ("green", (40, 175, 60)), ("blue", (40, 80, 225)), ("yellow", (238, 212, 40)),
    ("magenta", (215, 45, 205)), ("cyan", (40, 205, 215)), ("orange", (248, 140, 28)), ("purple", (120, 45, 175)),
)
MAX_CATEGORIES = len(SHAPES) * len(COLOURS) * len(TEXTURES)

TRAIN_JSON = "lvis_v1_train.json"
VAL_JSON = "lvis_v1_val.json"
MANIFEST = "manifest.json"
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}

# Occlusion rules: an earlier object must keep this fraction of its own area (and pixels) visible.
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 30
# Polygon simplification tolerance, in pixels of the 2x upsampled mask (0.3 px in the image).
POLY_EPSILON = 0.6


# ---- Categories and the long tail --------------------------------------------------------------
def category_specs(num_categories: int) -> List[Dict[str, Any]]:
    """Appearance of each category: a unique (shape, colour, texture) triple.

    Index ``i`` uses shape ``i % 8`` and a Latin-square colour ``(i + i // 8) % 8`` so that
    consecutive categories differ in both; the texture index shifts every 64 categories so the
    triples stay unique up to ``MAX_CATEGORIES`` (256).
    """
    if not 1 <= num_categories <= MAX_CATEGORIES:
        raise ValueError(f"num_categories must be in [1, {MAX_CATEGORIES}], got {num_categories}")
    specs = []
    for i in range(num_categories):
        shape = SHAPES[i % 8]
        colour_name, rgb = COLOURS[(i + i // 8) % 8]
        texture = TEXTURES[(i + 2 * (i // 8) + i // 64) % 4]
        specs.append(dict(shape=shape, colour=colour_name, rgb=rgb, texture=texture,
                          name=f"{colour_name}_{texture}_{shape}"))
    return specs


def _real_lvis_counts() -> np.ndarray:
    from detectron2.data.datasets.lvis_v1_category_image_count import (
        LVIS_CATEGORY_IMAGE_COUNT,
    )

    counts = [c["image_count"] for c in LVIS_CATEGORY_IMAGE_COUNT]
    return np.sort(np.asarray(counts, dtype=np.float64))


def longtail_image_counts(num_categories: int, num_train_images: int) -> np.ndarray:
    """Target number of training images per category, in ascending order.

    LVIS v1's real image counts are sampled at evenly spaced quantiles and mapped by a power law
    (a straight line in log-log space) that keeps the smallest at 1 image and sends the largest
    to ~50 % of the training images. LVIS's frequent band starts at 101 images, which half of a
    small dataset cannot reach: with >= 145 images the top is raised to (at most) 80 % and, if
    fewer than two categories would be frequent, the line is bent at a knee so the two largest
    are (two-segment log-log map, still monotone).
    """
    C, N = int(num_categories), int(num_train_images)
    real = _real_lvis_counts()
    picks = real[np.round(np.linspace(0, len(real) - 1, C)).astype(int)]
    if C == 1:
        return np.array([max(1, int(round(0.5 * N)))])
    top = 0.5 * N
    can_have_frequent = N >= 145
    if can_have_frequent:
        top = max(top, min(0.8 * N, 115.0))
    lp, lmax = np.log(picks), np.log(picks[-1])
    counts = np.exp(lp / lmax * np.log(top))
    min_frequent = 2 if C >= 6 else 1
    if can_have_frequent and C >= 3 and (counts > COMMON_MAX_IMAGES + 0.5).sum() < min_frequent:
        k = C - min_frequent  # first index that must be frequent
        knee_real = math.sqrt(picks[k - 1] * picks[k])
        knee = COMMON_MAX_IMAGES + 0.5
        lk = math.log(knee_real)
        low = np.exp(lp / lk * math.log(knee))
        high = np.exp(math.log(knee) + (lp - lk) / (lmax - lk) * (math.log(top) - math.log(knee)))
        counts = np.where(lp <= lk, low, high)
        counts[k:] = np.maximum(counts[k:], COMMON_MAX_IMAGES + 1)
        counts[:k] = np.minimum(counts[:k], COMMON_MAX_IMAGES)
    return np.clip(np.round(counts), 1, N).astype(np.int64)


def _val_image_counts(train_counts: np.ndarray, num_train: int, num_val: int,
                      floor: int | None = None) -> np.ndarray:
    """Val counts: train proportions with a floor so every category (rare too) is evaluable.
    floor: val images per category at least (None: 1-3, from the split size)."""
    C = len(train_counts)
    if floor is None:
        floor = int(np.clip((2 * num_val) // max(C, 1), 1, 3))
    v = np.round(train_counts * (num_val / max(num_train, 1))).astype(np.int64)
    return np.clip(v, floor, num_val)


def _fit_counts_to_capacity(counts: np.ndarray, num_images: int, max_objects: int) -> np.ndarray:
    """Make the counts assignable: every image non-empty, none above ``max_objects`` categories."""
    counts = np.clip(counts.astype(np.int64), 1, num_images)
    capacity = num_images * max_objects
    if len(counts) > capacity:
        raise ValueError(
            f"{len(counts)} categories cannot all appear in {num_images} images with at most "
            f"{max_objects} objects each; use more images or fewer categories")
    # Leave slack so the greedy assignment never runs out of free slots.
    limit = int(capacity * 0.85) if len(counts) <= capacity * 0.85 else capacity
    while counts.sum() > limit:
        counts = np.maximum(1, np.floor(counts * 0.95)).astype(np.int64)
    # Every image needs at least one object: top up the largest categories first.
    order = np.argsort(-counts, kind="stable")
    i = 0
    while counts.sum() < num_images:
        c = order[i % len(order)]
        if counts[c] < num_images:
            counts[c] += 1
        i += 1
    return counts


def _assign_categories(counts: np.ndarray, num_images: int, max_objects: int,
                       rng: np.random.Generator) -> List[List[int]]:
    """Choose, for each category, exactly ``counts[c]`` distinct images to contain it.

    Large categories go first; each picks the images that are below a random per-image soft
    capacity and least loaded, so every image ends up with 1..max_objects categories and the
    number of categories per image varies.
    """
    load = np.zeros(num_images, dtype=np.int64)
    soft_cap = rng.integers(1, max_objects + 1, size=num_images)
    members: List[List[int]] = [[] for _ in range(num_images)]
    for c in np.argsort(-counts, kind="stable"):
        t = int(counts[c])
        avail = np.flatnonzero(load < max_objects)
        if len(avail) < t:
            raise ValueError(
                f"cannot place category {c} in {t} images: only {len(avail)} have room")
        key = np.lexsort((rng.random(len(avail)), load[avail], load[avail] >= soft_cap[avail]))
        for i in avail[key[:t]]:
            members[i].append(int(c))
            load[i] += 1
    return members


# ---- Drawing -----------------------------------------------------------------------------------
def _unit_shape(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon vertices of a shape of radius ~1 around the origin, randomly rotated/stretched.

    Shapes that would turn into another class when rotated (a square at 45 degrees is a
    diamond) only get small rotations.
    """
    small_rot = shape in ("square", "diamond", "cross")
    w = 0.32  # the cross's arm half-width
    polygons = {  # fixed vertices; the others are drawn on circles
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82,
        "cross": np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                           [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=np.float64),
        "diamond": np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]], dtype=np.float64),
    }
    if shape in polygons:
        pts = polygons[shape]
    elif shape in ("circle", "ellipse"):
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ry = 1.0 if shape == "circle" else rng.uniform(0.45, 0.6)
        pts = np.stack([np.cos(a), ry * np.sin(a)], 1)
    elif shape == "triangle":
        a = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([np.cos(a), -np.sin(a)], 1)
    elif shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:  # hexagon
        a = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    if shape != "circle":  # mild aspect jitter; circles stay round to differ from ellipses
        pts = pts * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)])
    theta = rng.uniform(-0.3, 0.3) if small_rot else rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return pts @ rot.T


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Varied, low-saturation background: gradient + smooth noise + grey clutter (float32)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def muted() -> np.ndarray:
        return rng.uniform(60, 195) + rng.normal(0, 14, 3)

    c1, c2 = muted(), muted()
    ang = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(ang) + yy * np.sin(ang)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    # Smooth large-scale noise: upsampled coarse grid.
    cell = int(rng.choice([8, 16, 32]))
    coarse = rng.normal(0, rng.uniform(4, 16), size=(h // cell + 2, w // cell + 2, 1))
    coarse = np.repeat(coarse, 3, axis=2) + rng.normal(0, 3, size=coarse.shape[:2] + (3,))
    img = img + cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.ascontiguousarray(img, dtype=np.float32)
    # Low-contrast grey clutter (lines, blobs, boxes) as background distractors.
    base = float(img.mean())
    s = min(h, w)
    for _ in range(int(rng.integers(2, 9))):
        g = base + rng.uniform(-28, 28)
        col = tuple(float(g + d) for d in rng.normal(0, 5, 3))
        kind = int(rng.integers(3))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if kind == 0:
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, col, int(rng.integers(1, max(2, s // 40) + 1)))
        elif kind == 1:
            axes = (int(rng.integers(3, s // 5 + 4)), int(rng.integers(3, s // 5 + 4)))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, col, -1)
        else:
            p2 = (p1[0] + int(rng.integers(4, s // 4 + 5)),
                  p1[1] + int(rng.integers(4, s // 4 + 5)))
            cv2.rectangle(img, p1, p2, col, -1)
    return img


def _paint_object(img: np.ndarray, mask: np.ndarray, box: Tuple[int, int, int, int],
                  spec: Dict[str, Any], center: Tuple[float, float], size: float,
                  rng: np.random.Generator) -> None:
    """Fill ``mask`` (within ``box``) with the category's colour and texture, in place."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    u = (xx - center[0]) * np.cos(ang) + (yy - center[1]) * np.sin(ang)
    v = -(xx - center[0]) * np.sin(ang) + (yy - center[1]) * np.cos(ang)
    period = max(3.0, size * rng.uniform(0.2, 0.3))
    tex = spec["texture"]
    if tex == "striped":
        pat = (np.floor(u / period) % 2).astype(np.float32)
    elif tex == "checkered":
        pat = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif tex == "dotted":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        pat = (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    else:
        pat = np.zeros_like(u)
    primary = np.asarray(spec["rgb"], dtype=np.float32) * rng.uniform(0.85, 1.08)
    primary = primary + rng.normal(0, 6, 3).astype(np.float32)
    secondary = primary * 0.38  # same hue, darker: texture never changes the colour class
    shade = 1.0 + 0.18 * (u / max(size, 1.0))  # soft lighting gradient
    col = (primary[None, None] * (1 - pat[..., None]) + secondary[None, None] * pat[..., None])
    col = col * shade[..., None]
    region = img[y0:y1, x0:x1]
    m = mask[y0:y1, x0:x1]
    region[m] = col[m]


def _single_blob(mask: np.ndarray) -> bool:
    """True if the mask is one 8-connected piece without holes (expressible as one polygon)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return len(contours) == 1


def _render_image(h: int, w: int, required: Sequence[int], n_extra: int,
                  specs: Sequence[Dict[str, Any]], rng: np.random.Generator
                  ) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one image. Returns the uint8 RGB image and (category index, visible mask) pairs.

    The required categories (which fix the per-category image counts) are placed first with
    many attempts; ``n_extra`` extra instances of the same categories follow with few attempts
    and are skipped when they do not fit. A candidate placement is rejected if any earlier
    object would keep less than ``MIN_VISIBLE_FRACTION`` of its area or stop being a single
    hole-free piece; after every 8 failures the object shrinks.
    """
    img = _background(h, w, rng)
    s = min(h, w)
    extra = ([int(required[i]) for i in rng.integers(0, len(required), size=n_extra)]
             if n_extra else [])
    order = [int(c) for c in rng.permutation(np.asarray(required, dtype=np.int64))] + extra
    objs: List[Dict[str, Any]] = []
    for k, cat in enumerate(order):
        is_required = k < len(required)
        tries = 48 if is_required else 6
        # Log-uniform size in [12 %, 45 %] of the short side: more small objects than big.
        size = float(np.exp(rng.uniform(np.log(0.12), np.log(0.45)))) * s
        placed = None
        for attempt in range(tries):
            if attempt and attempt % 8 == 0:
                size = max(6.0, size * 0.8)
            pts = _unit_shape(specs[cat]["shape"], rng) * (size / 2)
            lo, hi = pts.min(0), pts.max(0)
            cx = rng.uniform(-lo[0], max(-lo[0], w - 1 - hi[0]))
            cy = rng.uniform(-lo[1], max(-lo[1], h - 1 - hi[1]))
            mask = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(mask, [np.round((pts + [cx, cy]) * 4).astype(np.int32)], 1,
                         lineType=cv2.LINE_8, shift=2)
            mask = mask.astype(bool)
            if mask.sum() < MIN_VISIBLE_PIXELS:
                continue
            new_vis = []
            ok = True
            for o in objs:
                if not (o["vis"] & mask).any():
                    new_vis.append(o["vis"])
                    continue
                nv = o["vis"] & ~mask
                n = int(nv.sum())
                too_hidden = n < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * o["full_area"])
                if too_hidden or not _single_blob(nv):
                    ok = False
                    break
                new_vis.append(nv)
            if ok:
                placed = (mask, new_vis, (cx, cy), size)
                break
        if placed is None:
            if is_required:
                logger.debug("could not place a required object of category %d", cat)
            continue
        mask, new_vis, center, size = placed
        for o, nv in zip(objs, new_vis):
            o["vis"] = nv
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        _paint_object(img, mask, box, specs[cat], center, size, rng)
        objs.append(dict(cat=cat, vis=mask, full_area=int(mask.sum())))
    img = img + rng.normal(0, 3.0, size=img.shape).astype(np.float32)  # sensor noise
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out, [(o["cat"], o["vis"]) for o in objs]


def _mask_to_annotation(mask: np.ndarray) -> Optional[Dict[str, Any]]:
    """Polygons, bbox [x, y, w, h] and area of a binary mask; None if it has no valid polygon.

    Contours are traced on the 2x nearest-upsampled mask: a boundary sub-pixel centre lies 0.25
    px inside the pixel edge, so the polygon encloses the mask's pixel centres and excludes its
    neighbours', and pycocotools rasterises it back to (almost exactly) the same mask.
    """
    area = int(mask.sum())
    if area < MIN_VISIBLE_PIXELS:
        return None
    up = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = cv2.approxPolyDP(c, POLY_EPSILON, True).reshape(-1, 2)
        if len(c) < 3:
            continue
        p = c.astype(np.float64) / 2.0 + 0.25
        polys.append([float(v) for v in p.ravel()])
    if not polys:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
    return dict(segmentation=polys, bbox=bbox, area=float(area))


# ---- Dataset assembly --------------------------------------------------------------------------
def _image_file(split: str, image_id: int) -> str:
    return f"{SPLIT_DIRS[split]}/{image_id:012d}.jpg"


def _expected_files(root: str, params: Dict[str, Any]) -> List[str]:
    n_train, n_val = params["num_train_images"], params["num_val_images"]
    files = [os.path.join(root, TRAIN_JSON), os.path.join(root, VAL_JSON)]
    files += [os.path.join(root, _image_file("train", i)) for i in range(1, n_train + 1)]
    files += [os.path.join(root, _image_file("val", i))
              for i in range(n_train + 1, n_train + n_val + 1)]
    return files


def _generate_split(root: str, split: str, first_image_id: int, first_ann_id: int,
                    counts: np.ndarray, num_images: int, h: int, w: int, max_objects: int,
                    specs: Sequence[Dict[str, Any]], seed: int
                    ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Render and save one split's images; return its LVIS image and annotation dicts."""
    split_key = 0 if split == "train" else 1
    C = len(specs)
    members = _assign_categories(counts, num_images, max_objects,
                                 np.random.default_rng([seed, split_key, 7]))
    os.makedirs(os.path.join(root, SPLIT_DIRS[split]), exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for i in range(num_images):
        image_id = first_image_id + i
        rng = np.random.default_rng([seed, split_key, 1000 + i])
        required = sorted(members[i])
        n_extra = int(rng.binomial(max_objects - len(required), 0.3))
        pixels, objs = _render_image(h, w, required, n_extra, specs, rng)
        present = set()
        for cat, vis in objs:
            ann = _mask_to_annotation(vis)
            if ann is None:  # too little visible to annotate
                continue
            present.add(cat)
            annotations.append(dict(id=ann_id, image_id=image_id, category_id=cat + 1,
                                    segmentation=ann["segmentation"], area=ann["area"],
                                    bbox=ann["bbox"]))
            ann_id += 1
        # Federated LVIS labels. This dataset is exhaustively annotated, so any absent
        # category may be listed as a verified negative; LVIS lists a subset.
        absent = np.array([c for c in range(C) if c not in present], dtype=np.int64)
        if len(absent):
            k = int(rng.integers(math.ceil(0.3 * len(absent)), math.ceil(0.7 * len(absent)) + 1))
            neg = sorted(int(c) + 1 for c in rng.choice(absent, size=k, replace=False))
        else:
            neg = []
        not_exhaustive = []
        if present and rng.random() < 0.05:
            not_exhaustive = [int(rng.choice(sorted(present))) + 1]
        file_name = _image_file(split, image_id)
        Image.fromarray(pixels).save(os.path.join(root, file_name), format="JPEG", quality=90)
        images.append(dict(id=image_id, width=w, height=h, file_name=file_name,
                           coco_url=f"http://images.cocodataset.org/{file_name}", license=1,
                           date_captured="2024-01-01 00:00:00", neg_category_ids=neg,
                           not_exhaustive_category_ids=not_exhaustive))
    return images, annotations


def _categories_json(specs: Sequence[Dict[str, Any]], train_anns: Sequence[Dict[str, Any]]
                     ) -> List[Dict[str, Any]]:
    """LVIS category records; counts and frequency come from the generated train split."""
    C = len(specs)
    img_sets: List[set] = [set() for _ in range(C)]
    inst = np.zeros(C, dtype=np.int64)
    for a in train_anns:
        img_sets[a["category_id"] - 1].add(a["image_id"])
        inst[a["category_id"] - 1] += 1
    cats = []
    for i, sp in enumerate(specs):
        n_img = len(img_sets[i])
        cats.append(dict(id=i + 1, name=sp["name"], synset=f"{sp['name']}.n.01", synonyms=[sp["name"]],
                         **{"def": f"{TEXTURE_WORDS[sp['texture']]} {sp['colour']} {sp['shape']} "
                                   f"drawn on a cluttered background"},
                         frequency=frequency_group(n_img) if n_img > 0 else "r", image_count=n_img,
                         instance_count=int(inst[i])))
    return cats


def make_longtail_dataset(root: str, *, num_train_images: int = 400, num_val_images: int = 100,
                          num_categories: int = 24, image_size: Tuple[int, int] = (256, 320),
                          max_objects_per_image: int = 6, seed: int = 0,
                          val_min_images: int | None = None, overwrite: bool = False) -> Dict[str, Any]:
    """Generate (or reuse) the embedded long-tailed LVIS-v1-format dataset under ``root``.

    Image (and annotation) ids run 1..N_train for train and continue for val. ``num_categories`` is
    1..256; ``image_size`` is (height, width); ``val_min_images``: val images per category at least
    (None: 1-3 from the split size; a result table raises it so that APr is measurable).
    ``overwrite``: regenerate even if ``root`` holds a dataset made with other parameters (else a
    ValueError, as for infeasible parameters).

    Returns ``train_json``, ``val_json``, ``image_root`` (= ``root``), ``categories`` (count),
    ``manifest``, ``num_train_images``, ``num_val_images``, ``frequency_counts`` ({"r", "c", "f"} ->
    categories), ``image_counts`` (train images per category id 1..C) and ``generated`` (False when
    an existing dataset was reused).
    """
    root = os.fspath(root)
    h, w = int(image_size[0]), int(image_size[1])
    params = dict(num_train_images=int(num_train_images), num_val_images=int(num_val_images),
                  num_categories=int(num_categories), image_size=[h, w],
                  max_objects_per_image=int(max_objects_per_image), seed=int(seed))
    if val_min_images is not None:  # only when set: datasets made before the option keep their manifest
        params["val_min_images"] = int(val_min_images)
    if num_train_images < 1 or num_val_images < 1:
        raise ValueError("num_train_images and num_val_images must be >= 1")
    if max_objects_per_image < 1:
        raise ValueError("max_objects_per_image must be >= 1")
    if min(h, w) < 32:
        raise ValueError(f"image_size {image_size} is too small (min side must be >= 32)")
    specs = category_specs(num_categories)

    train_json = os.path.join(root, TRAIN_JSON)
    val_json = os.path.join(root, VAL_JSON)
    manifest_path = os.path.join(root, MANIFEST)
    result = dict(train_json=train_json, val_json=val_json, image_root=root,
                  categories=int(num_categories), manifest=manifest_path,
                  num_train_images=int(num_train_images), num_val_images=int(num_val_images))

    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            # Written last and atomically by this generator: a corrupt one was edited or damaged.
            if not overwrite:
                raise ValueError(f"{manifest_path} is not a valid manifest ({e}); pass overwrite=True "
                                 "(CLI: --overwrite) to regenerate the dataset, or choose another directory") from e
            manifest = {}
        same = manifest.get("params") == params and manifest.get("version") == DATASET_VERSION
        if same and all(os.path.exists(p) for p in _expected_files(root, params)):
            logger.info("Reusing the long-tailed dataset in %s "
                        "(same parameters, all files present)", root)
            result.update(manifest.get("summary", {}), generated=False)
            return result
        if not same and not overwrite:
            raise ValueError(
                f"{root} already holds a dataset generated with different parameters "
                f"(found version {manifest.get('version')} {manifest.get('params')}, requested "
                f"version {DATASET_VERSION} {params}); pass overwrite=True (CLI: --overwrite) "
                f"or choose another directory")
        # Drop the manifest first: an interrupted regeneration must not look complete.
        os.remove(manifest_path)
        _remove_old_images(root)
        logger.info("Regenerating the long-tailed dataset in %s", root)

    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    # Which categories are rare/common/frequent is fixed per category count (not per seed), so
    # different seeds give the same long tail over different images.
    target = longtail_image_counts(num_categories, num_train_images)
    perm = np.random.default_rng(7919 + num_categories).permutation(num_categories)
    train_counts = np.empty(num_categories, dtype=np.int64)
    train_counts[perm] = target
    train_counts = _fit_counts_to_capacity(train_counts, num_train_images, max_objects_per_image)
    val_counts = _fit_counts_to_capacity(
        _val_image_counts(train_counts, num_train_images, num_val_images, val_min_images),
        num_val_images, max_objects_per_image)

    train_images, train_anns = _generate_split(
        root, "train", 1, 1, train_counts, num_train_images, h, w, max_objects_per_image,
        specs, seed)
    val_images, val_anns = _generate_split(
        root, "val", num_train_images + 1, len(train_anns) + 1, val_counts, num_val_images, h, w,
        max_objects_per_image, specs, seed)
    categories = _categories_json(specs, train_anns)

    info = dict(description="drcl_d2 embedded long-tailed dataset (synthetic, LVIS v1 format)",
                url="", version=str(DATASET_VERSION), year=2024,
                contributor="drcl_d2 synthetic generator", date_created="2024-01-01")
    licenses = [dict(id=1, name="Synthetic data, no restrictions", url="")]
    for path, images, anns in ((train_json, train_images, train_anns),
                               (val_json, val_images, val_anns)):
        atomic_write_json(dict(info=info, licenses=licenses, images=images, annotations=anns,
                               categories=categories), path, separators=(",", ":"))

    bands = [c["frequency"] for c in categories]
    summary = {"frequency_counts": {b: bands.count(b) for b in "rcf"},
               "image_counts": [c["image_count"] for c in categories]}
    atomic_write_json(dict(version=DATASET_VERSION, params=params, summary=summary), manifest_path,
                      separators=(",", ":"))
    logger.info("Generated the long-tailed dataset in %s in %.1fs: %d train / %d val images, "
                "%d categories (r/c/f = %d/%d/%d), %d train / %d val annotations",
                root, time.perf_counter() - t0, num_train_images, num_val_images,
                num_categories, summary["frequency_counts"]["r"], summary["frequency_counts"]["c"],
                summary["frequency_counts"]["f"], len(train_anns), len(val_anns))
    result.update(summary, generated=True)
    return result


_IMAGE_NAME = re.compile(r"^\d{12}\.jpg$")


def _remove_old_images(root: str) -> None:
    """Delete images this generator wrote earlier (only its own 12-digit names)."""
    for d in SPLIT_DIRS.values():
        folder = os.path.join(root, d)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if _IMAGE_NAME.match(name):
                    os.remove(os.path.join(folder, name))


# ---- CLI ---------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m drcl_d2.data.synthetic OUTPUT_DIR [--preset ...] [overrides]``."""
    parser = argparse.ArgumentParser(
        prog="drcl-make-dataset",
        description="Write the embedded long-tailed dataset (LVIS v1 format) to OUTPUT_DIR.")
    parser.add_argument("output_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="size preset (default: small); the options below override it")
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--val-images", type=int, default=None)
    parser.add_argument("--categories", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate even if OUTPUT_DIR holds a dataset with other parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs = dict(PRESETS[args.preset])
    for option, key in (("train_images", "num_train_images"), ("val_images", "num_val_images"),
                        ("categories", "num_categories")):
        if getattr(args, option) is not None:
            kwargs[key] = getattr(args, option)
    try:
        out = make_longtail_dataset(args.output_dir, seed=args.seed, overwrite=args.overwrite,
                                    **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fc = out["frequency_counts"]
    print(f"train json: {out['train_json']}\nval json:   {out['val_json']}\n"
          f"image root: {out['image_root']}\ncategories: {out['categories']} "
          f"(rare {fc['r']}, common {fc['c']}, frequent {fc['f']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
