"""Class-agnostic proposal boxes for 2DRCL pretraining (INPUT.TWO_VIEW.BOX_SOURCE "proposals").

A proposals file is COCO/LVIS json, either a detection-results list (what
``python -m drcl_d2.tools.make_proposals`` writes)::

    [{"image_id": 1, "bbox": [x, y, w, h], "score": 0.9, "category_id": 1}, ...]

or a dict whose "annotations" list has entries of that form (a ground-truth-style file). "score"
is optional (without it, a box keeps its place in the file); "category_id" is ignored.

Behaviour on imperfect input (each case counted in the returned stats):

- not readable as JSON, or another structure (an entry without "image_id", a "bbox" that is not
  four numbers): ``ValueError`` naming the file (and the entry);
- a non-finite box, or one with width or height < 1 px: dropped, one warning with the count and
  the first few (image id, box);
- entries for image ids that are not in the dataset: ignored, one info log with the count;
- (:func:`check_proposals_against_images`) boxes partly outside their image: clipped to it;
  boxes with width or height < 1 after clipping: dropped, one warning as above;
- dataset images with no proposal left: dropped from the pretraining list with ONE warning that
  counts them and names the first few ids; ``ValueError`` if no image is left.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np

from ..utils import name_some
from .datasets import read_json_file

logger = logging.getLogger(__name__)

__all__ = ["load_proposals", "check_proposals_against_images", "load_proposals_from_config"]

MIN_SIDE = 1.0  # boxes narrower or shorter than this (pixels) are degenerate


def _entries(json_file: str) -> list:
    data = read_json_file(json_file, "proposals file")
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"proposals file {json_file}: a JSON object must hold an 'annotations' list "
                             f"(found keys {sorted(data)[:10]}); or give a detection-results list")
        return data["annotations"]
    if not isinstance(data, list):
        raise ValueError(f"proposals file {json_file}: expected a detection-results list or an object with "
                         f"'annotations', found {type(data).__name__}")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_proposals(json_file: str, image_ids: Iterable[int] | None) -> tuple[dict[int, np.ndarray], dict]:
    """Class-agnostic boxes per image from a proposals file (either form, see the module doc).

    Args:
        json_file: the proposals file.
        image_ids: ids of the dataset's images; entries for other ids are ignored (None: keep all).
    Returns:
        ({image_id: (n, 4) float32 XYXY sorted by score desc}, stats) with stats keys
        "entries", "boxes", "images", "non_finite", "degenerate", "unknown_image_entries",
        "unknown_images". Images without a valid box are absent from the dict.
    """
    entries = _entries(json_file)
    wanted = None if image_ids is None else set(image_ids)
    per_image: dict[int, list[tuple[float, int, list[float]]]] = {}
    non_finite, degenerate, unknown = [], [], []  # unknown: the image id of each entry for another image
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or "bbox" not in entry:
            raise ValueError(f"proposals file {json_file}: entry {k} must be an object with 'image_id' and "
                             f"'bbox', got {str(entry)[:200]}")
        bbox, image_id = entry["bbox"], entry["image_id"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"proposals file {json_file}: entry {k} (image id {image_id}) has bbox "
                             f"{str(bbox)[:100]}, expected [x, y, w, h] numbers")
        score = entry.get("score", 1.0)
        if not _is_number(score):
            raise ValueError(f"proposals file {json_file}: entry {k} (image id {image_id}) has score {score!r}")
        if wanted is not None and image_id not in wanted:
            unknown.append(image_id)
            continue
        if not all(math.isfinite(v) for v in bbox) or not math.isfinite(score):
            non_finite.append((image_id, bbox))
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w < MIN_SIDE or h < MIN_SIDE:
            degenerate.append((image_id, bbox))
            continue
        # k breaks score ties: file order is kept for equal (or absent) scores.
        per_image.setdefault(image_id, []).append((-float(score), k, [x, y, x + w, y + h]))

    for dropped, what in ((non_finite, "non-finite proposal box(es)"),
                          (degenerate, f"degenerate proposal box(es) (width or height < {MIN_SIDE:g} px)")):
        if dropped:
            logger.warning(f"{json_file}: dropped {len(dropped)} {what} (image id, box): {name_some(dropped)}")
    if unknown:
        logger.info(f"{json_file}: ignored {len(unknown)} proposal(s) of {len(set(unknown))} image id(s) "
                    f"not in the dataset: {name_some(sorted(set(unknown), key=str))}")
    proposals = {
        image_id: np.asarray([b for _, _, b in sorted(rows)], dtype=np.float32).reshape(-1, 4)
        for image_id, rows in per_image.items()
    }
    stats = {
        "entries": len(entries),
        "boxes": sum(len(b) for b in proposals.values()),
        "images": len(proposals),
        "non_finite": len(non_finite),
        "degenerate": len(degenerate),
        "unknown_image_entries": len(unknown),
        "unknown_images": len(set(unknown)),
    }
    logger.info(f"Loaded {stats['boxes']} proposals for {stats['images']} images from {json_file}")
    return proposals, stats


def check_proposals_against_images(proposals: dict[int, np.ndarray], dataset_dicts: list[dict]
                                   ) -> tuple[dict[int, np.ndarray], list[dict], dict]:
    """Fit proposals to the dataset's images and drop images that have none.

    Boxes are clipped to their image (``height``/``width`` of the dataset dict); boxes with a side
    < 1 px after clipping are dropped; images without a box left are dropped from the list.
    Proposals of images not in ``dataset_dicts`` are left out of the returned dict.

    Returns:
        (proposals: {image_id: (n, 4) float32 XYXY, order kept}, kept dataset dicts (same order),
        stats with "clipped", "degenerate_after_clip", "images_without_proposals", "images_kept",
        "boxes")
    Raises:
        ValueError: no dataset image has a proposal.
    """
    out: dict[int, np.ndarray] = {}
    kept, missing, degenerate = [], [], []
    clipped = 0
    for d in dataset_dicts:
        image_id = d["image_id"]
        boxes = proposals.get(image_id)
        if boxes is None or len(boxes) == 0:
            missing.append(image_id)
            continue
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        fitted = boxes.clip(0, np.array([d["width"], d["height"], d["width"], d["height"]], boxes.dtype))
        clipped += int((fitted != boxes).any(axis=1).sum())
        good = ((fitted[:, 2] - fitted[:, 0]) >= MIN_SIDE) & ((fitted[:, 3] - fitted[:, 1]) >= MIN_SIDE)
        degenerate.extend((image_id, boxes[i].tolist()) for i in np.flatnonzero(~good))
        if not good.any():
            missing.append(image_id)
            continue
        out[image_id] = fitted[good]
        kept.append(d)

    if clipped:
        logger.info(f"clipped {clipped} proposal box(es) that reached outside their image")
    if degenerate:
        logger.warning(f"dropped {len(degenerate)} proposal box(es) with width or height < {MIN_SIDE:g} px after "
                       f"clipping to the image (image id, box): {name_some(degenerate)}")
    if missing:
        logger.warning(f"{len(missing)} of {len(dataset_dicts)} images have no proposals and are left out of "
                       f"pretraining: image ids {name_some(missing)}")
    if not kept:
        raise ValueError(f"none of the {len(dataset_dicts)} dataset images has a proposal: are the proposals "
                         "file and the dataset the same (image ids)?")
    stats = {
        "clipped": clipped,
        "degenerate_after_clip": len(degenerate),
        "images_without_proposals": len(missing),
        "images_kept": len(kept),
        "boxes": sum(len(b) for b in out.values()),
    }
    return out, kept, stats


def load_proposals_from_config(cfg, dataset_dicts: list[dict]) -> tuple[dict[int, np.ndarray], list[dict], dict]:
    """Load every file of INPUT.TWO_VIEW.PROPOSAL_FILES and fit them to ``dataset_dicts``.

    One file per dataset of DATASETS.TRAIN (as detectron2's DATASETS.PROPOSAL_FILES_TRAIN);
    image ids must be unique across the datasets, so the files' boxes are merged by image id.
    Returns what :func:`check_proposals_against_images` returns, its stats merged with the loads'.
    """
    files = list(cfg.INPUT.TWO_VIEW.PROPOSAL_FILES)
    if len(files) != len(cfg.DATASETS.TRAIN):
        raise ValueError(f"INPUT.TWO_VIEW.PROPOSAL_FILES has {len(files)} file(s) but DATASETS.TRAIN has "
                         f"{len(cfg.DATASETS.TRAIN)} dataset(s): give one proposals file per dataset")
    image_ids = [d["image_id"] for d in dataset_dicts]
    merged: dict[int, np.ndarray] = {}
    stats: dict = {}
    for f in files:
        props, s = load_proposals(f, image_ids)
        for image_id, boxes in props.items():
            # An image listed in two files keeps both box sets (in file order).
            merged[image_id] = boxes if image_id not in merged else np.concatenate([merged[image_id], boxes])
        for key, value in s.items():
            stats[key] = stats.get(key, 0) + value
    out, kept, check_stats = check_proposals_against_images(merged, dataset_dicts)
    stats.update(check_stats)
    return out, kept, stats
