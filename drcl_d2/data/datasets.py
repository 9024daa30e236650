"""LVIS-format datasets registered from the config (DATASETS.LVIS_CUSTOM), with input checks.

detectron2's ``register_lvis_instances`` only knows the builtin LVIS splits and its loader assumes
category ids 1..N and images found through ``coco_url``. This loader reads any LVIS-format json
(the embedded dataset, a user's LVIS subset) and stops or warns on bad input, naming the file,
image id or annotation id at fault:

- not a readable json / no images / missing "images" "annotations" "categories": error;
- an annotation whose category or image is not in the json: error (a label bug, never guessed);
- a category id listed twice in "categories": error (class names would shift by one);
- a degenerate box (non-finite, width or height <= 0), a box entirely outside its image (the mapper
  would clip it away) or a polygon with < 3 points: the annotation is skipped with one warning
  that counts them and names the first few;
- image files missing on disk: error listing how many and the first few (checked when the json is
  loaded, before the model is built, by the first process of each machine; DATASETS.CHECK_IMAGE_FILES
  False turns it off for storage where stat-ing 100k files is slow); a file that exists but cannot be decoded is handled by the mapper
  (:class:`drcl_d2.data.mappers.SkippingDatasetMapper`).
"""
from __future__ import annotations

import json
import logging
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..utils import MAX_NAMED, name_some
from .image_folder import register_image_folders_from_config
from .metadata_cache import read_cached_metadata, write_cached_metadata

logger = logging.getLogger(__name__)

__all__ = ["register_lvis_format", "register_datasets_from_config", "load_lvis_format_json",
           "ensure_dataset_metadata", "check_lvis_frequencies", "sorted_categories", "FREQUENCIES"]



def read_json_file(json_file: str, what: str = "LVIS json"):
    """json.load with errors that name the file (missing, unreadable, not JSON)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{what} not found: {json_file}")
    try:
        with open(json_file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {json_file} is not valid JSON: {e}") from e


def _read_json(json_file: str) -> dict:
    data = read_json_file(json_file)
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: expected a JSON object, found {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_file}: missing top-level key {key!r} (LVIS format needs it)")
    if not data["images"]:
        raise ValueError(f"{json_file}: the dataset has no images")
    if not data["categories"]:
        raise ValueError(f"{json_file}: the dataset has no categories")
    return data


def sorted_categories(data: dict, json_file: str) -> list[dict]:
    """The json's categories sorted by id; an id listed twice is an error (names would shift by one)."""
    categories = sorted(data["categories"], key=lambda c: c["id"])
    dups = sorted({a["id"] for a, b in zip(categories, categories[1:]) if a["id"] == b["id"]})
    if dups:
        raise ValueError(f"{json_file}: category id(s) {name_some(dups)} are listed more than once in 'categories'; "
                         "each category needs a unique id")
    return categories


def image_path(image_root: str, img: dict, rule: str = "auto") -> str:
    """Where an image lives: `file_name` under image_root, or coco_url's split folder (LVIS v1)."""
    if rule not in ("auto", "file_name", "coco_url"):
        raise ValueError(f"DATASETS.LVIS_CUSTOM_PATH_RULE must be auto|file_name|coco_url, got {rule!r}")
    if rule == "file_name" or (rule == "auto" and "file_name" in img):
        if "file_name" not in img:
            raise ValueError(f"image id {img.get('id')} has no 'file_name' (path rule 'file_name')")
        return os.path.join(image_root, img["file_name"])
    if "coco_url" not in img:
        raise ValueError(f"image id {img.get('id')} has neither 'file_name' nor 'coco_url'")
    split_folder, file_name = img["coco_url"].split("/")[-2:]
    return os.path.join(image_root, split_folder, file_name)


def _valid_box(bbox) -> bool:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return False
    return bbox[2] > 0 and bbox[3] > 0


def _outside_image(bbox, img: dict) -> bool:
    """True when an XYWH box does not overlap its image at all: clipping would leave nothing."""
    x, y, w, h = bbox
    return x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0


def _valid_segmentation(segm) -> bool:
    if isinstance(segm, dict):  # RLE
        return "counts" in segm and "size" in segm
    return isinstance(segm, list) and len(segm) > 0 and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm)


def load_lvis_format_json(json_file: str, image_root: str, dataset_name: str | None = None,
                          path_rule: str = "auto", check_files: bool = True) -> list[dict]:
    """Read an LVIS-format json into detectron2 dataset dicts (contiguous category ids 0..C-1)."""
    data = _read_json(json_file)
    categories = sorted_categories(data, json_file)
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    images = {}
    for img in data["images"]:
        if "id" not in img or "height" not in img or "width" not in img:
            raise ValueError(f"{json_file}: an image entry lacks id/height/width: {str(img)[:200]}")
        if img["id"] in images:
            raise ValueError(f"{json_file}: image id {img['id']} appears twice")
        images[img["id"]] = img

    anns_per_image: dict[int, list[dict]] = {i: [] for i in images}
    bad_boxes, outside, bad_segms, seen_ann_ids = [], [], [], set()
    for ann in data["annotations"]:
        ann_id = ann.get("id")
        if ann_id in seen_ann_ids:
            raise ValueError(f"{json_file}: annotation id {ann_id} appears twice")
        seen_ann_ids.add(ann_id)
        if ann.get("image_id") not in images:
            raise ValueError(f"{json_file}: annotation id {ann_id} refers to image id {ann.get('image_id')}, "
                             "which is not in 'images'")
        if ann.get("category_id") not in id_map:
            raise ValueError(f"{json_file}: annotation id {ann_id} (image id {ann['image_id']}) has category_id "
                             f"{ann.get('category_id')}, which is not in 'categories'")
        if not _valid_box(ann.get("bbox")):
            bad_boxes.append(f"ann {ann_id}/image {ann['image_id']} bbox={ann.get('bbox')}")
            continue
        img = images[ann["image_id"]]
        if _outside_image(ann["bbox"], img):
            outside.append(f"ann {ann_id}/image {ann['image_id']} bbox={ann['bbox']} "
                           f"image {img['width']}x{img['height']}")
            continue
        obj = {"bbox": [float(v) for v in ann["bbox"]], "bbox_mode": BoxMode.XYWH_ABS,
               "category_id": id_map[ann["category_id"]]}
        if "segmentation" in ann:
            if not _valid_segmentation(ann["segmentation"]):
                bad_segms.append(f"ann {ann_id}/image {ann['image_id']}")
                continue
            obj["segmentation"] = ann["segmentation"]
        anns_per_image[ann["image_id"]].append(obj)
    for skipped, what in ((bad_boxes, "with a degenerate box (non-finite, or width/height <= 0)"),
                          (outside, "whose box lies entirely outside its image (json width x height; detectron2 "
                                    "would clip it to nothing and train on an empty target)"),
                          (bad_segms, "with an invalid polygon (< 3 points or odd length)")):
        if skipped:
            logger.warning(f"{json_file}: skipped {len(skipped)} annotation(s) {what}: {name_some(skipped)}")

    dataset_dicts, missing = [], []
    for image_id in sorted(images):
        img = images[image_id]
        path = image_path(image_root, img, path_rule)
        if check_files and not os.path.isfile(path):
            missing.append(f"{path} (image id {image_id})")
        dataset_dicts.append({
            "file_name": path,
            "height": img["height"],
            "width": img["width"],
            "image_id": image_id,
            "not_exhaustive_category_ids": img.get("not_exhaustive_category_ids", []),
            "neg_category_ids": img.get("neg_category_ids", []),
            "annotations": anns_per_image[image_id],
        })
    if missing:
        raise FileNotFoundError(f"{json_file}: {len(missing)} of {len(images)} image files are missing under "
                                f"{image_root}: {name_some(missing)}")
    if dataset_name is not None:
        fields = _metadata_from_json(data, categories)
        _set_json_metadata(dataset_name, fields)
        write_cached_metadata(json_file, fields)
    logger.info(f"Loaded {len(dataset_dicts)} images in LVIS format from {json_file}")
    return dataset_dicts


FREQUENCIES = ("r", "c", "f")
# Fields of a ground-truth annotation that evaluation reads from the json itself (LVIS API).
EVAL_FIELDS = ("area", "segmentation")


def check_lvis_frequencies(json_file: str, categories: list[dict] | None = None) -> None:
    """LVIS evaluation (APr/APc/APf) needs `frequency` in {r, c, f} on every category."""
    if categories is None:
        categories = _read_json(json_file)["categories"]
    bad = [f"id {c.get('id')} ({c.get('name', '?')}, frequency={c.get('frequency')!r})"
           for c in categories if c.get("frequency") not in FREQUENCIES]
    if bad:
        raise ValueError(f"{json_file}: {len(bad)} categories lack a 'frequency' of 'r', 'c' or 'f' (lower case), "
                         f"which LVIS evaluation needs (APr/APc/APf): {name_some(bad)}. Set it (rare: 1-10 training "
                         "images, common: 11-100, frequent: >100) or evaluate with COCOEvaluator.")


def _metadata_from_json(data: dict, categories: list[dict]) -> dict:
    """What drcl_d2 records about an LVIS-format json in its MetadataCatalog entry.

    Besides detectron2's fields, what evaluation will need from the json (a frequency per category,
    `area` and `segmentation` per annotation) is recorded, so that the trainer can check it before
    the first iteration without reading the json again: annotations_lacking is {field: (count,
    first few annotation ids)} for each of EVAL_FIELDS that some annotations lack.
    """
    lacking = {key: [a.get("id") for a in data["annotations"] if key not in a] for key in EVAL_FIELDS}
    return {
        "thing_classes": [c.get("name", str(c["id"])) for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
        "class_image_count": [{"id": c["id"], "image_count": c.get("image_count", 0)} for c in categories],
        "category_frequencies": [c.get("frequency") for c in categories],
        "annotations_lacking": {key: (len(ids), ids[:MAX_NAMED]) for key, ids in lacking.items() if ids},
    }


def _set_json_metadata(name: str, fields: dict) -> None:
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:  # Metadata.set refuses to change a value: set once
        meta.set(**fields)


def register_lvis_format(name: str, json_file: str, image_root: str, path_rule: str = "auto",
                         check_files: bool = True) -> None:
    """Register an LVIS-format dataset under `name` (evaluator_type "lvis"), without reading it.

    The json is parsed once, when the dataset is first used: by the loader (DatasetCatalog.get),
    which also fills in the metadata read from it (classes, id map, frequencies, what evaluation
    needs; as detectron2's ``load_lvis_json(dataset_name=...)`` does), or by
    :func:`ensure_dataset_metadata` for a check that needs the metadata first (that parse's
    metadata is cached on disk, see :mod:`drcl_d2.data.metadata_cache`). A dataset that a run does
    not use is never read. `check_files`: whether the loader checks that every image file exists
    (DATASETS.CHECK_IMAGE_FILES; done by the first process of each machine only).
    """
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return  # same registration again (e.g. setup() called twice): nothing to do
        raise ValueError(f"Dataset name {name!r} is already registered with other files")

    def load():
        # Stat every image once per machine, not once per rank (a network file system feels it).
        return load_lvis_format_json(json_file, image_root, name, path_rule,
                                     check_files=check_files and comm.get_local_rank() == 0)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis",
                                  drcl_lvis_format=True)


def ensure_dataset_metadata(name: str) -> None:
    """Fill in the json-derived metadata of an LVIS-format dataset registered by drcl_d2, when the
    loader has not yet: from the on-disk metadata cache when it matches the json, else by loading
    the dataset (one parse). Datasets registered otherwise are left as they are."""
    meta = MetadataCatalog.get(name)
    if not meta.get("drcl_lvis_format") or meta.get("thing_classes") is not None:
        return
    cached = read_cached_metadata(meta.json_file)
    if cached is not None:
        _set_json_metadata(name, cached)
        return
    DatasetCatalog.get(name)  # parses, sets the metadata and writes the cache


def register_datasets_from_config(cfg) -> list[str]:
    """Register every [name, json_file, image_root] triple of cfg.DATASETS.LVIS_CUSTOM (no json is
    read here: see :func:`register_lvis_format`)."""
    names = []
    for i, entry in enumerate(cfg.DATASETS.LVIS_CUSTOM):
        if len(entry) != 3:
            raise ValueError(f"DATASETS.LVIS_CUSTOM[{i}] must be [name, json_file, image_root], got {list(entry)}")
        name, json_file, image_root = entry
        register_lvis_format(name, json_file, image_root, cfg.DATASETS.LVIS_CUSTOM_PATH_RULE,
                             check_files=cfg.DATASETS.CHECK_IMAGE_FILES)
        names.append(name)
    names += register_image_folders_from_config(cfg)  # DATASETS.IMAGE_FOLDERS: unlabeled (DetCo / MoCo v2)
    return names
