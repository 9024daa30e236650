"""Checks of the fine-tuning inputs that run once, before the first iteration.

What a run would otherwise trip over late (at iteration 0, on the image that shows it mid-training,
or in the evaluation after the whole training) and what can be known from the config, the datasets'
metadata and the dataset dicts without decoding images is checked here. The dataset-dict check is
one linear pass over the annotations (under a second for LVIS v1's 1.27M); the metadata checks read
what the loader recorded when it parsed the json (the trainer builds the training dicts first), and
for a DATASETS.TEST json the on-disk metadata cache, or one parse
(:func:`drcl_d2.data.datasets.ensure_dataset_metadata`).

Each is an error that names the dataset, the json, the first few ids and the config key to set:

- MODEL.ROI_HEADS.NUM_CLASSES (MODEL.RETINANET.NUM_CLASSES for RetinaNet) must equal the category
  count of every training and evaluation dataset: fewer turns the last categories into the
  background label, more makes the evaluator fail to map the extra classes back;
- with MODEL.MASK_ON, every training annotation needs a `segmentation`, and RLE needs
  INPUT.MASK_FORMAT bitmask (polygon, the default, only takes polygons);
- for each DATASETS.TEST dataset evaluated by LVISEvaluator: every category's `frequency` in
  {r, c, f}, every annotation's `area` (area ranges), and `segmentation` when masks are evaluated.

Decoding every image (real sizes, unreadable files) is too slow here at LVIS scale: it is the opt-in
``python -m drcl_d2.tools.check_dataset``; at training time the mapper skips such images with a
warning (:class:`drcl_d2.data.mappers.SkippingDatasetMapper`).
"""
from __future__ import annotations

from detectron2.data import MetadataCatalog

from ..utils import name_some
from .datasets import FREQUENCIES, check_lvis_frequencies, ensure_dataset_metadata

__all__ = ["num_classes_key", "check_num_classes", "check_training_dicts", "check_evaluation_datasets"]


def num_classes_key(cfg) -> tuple[str, int]:
    """The config key holding the model's category count, and its value."""
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES


def _describe(name: str) -> str:
    json_file = MetadataCatalog.get(name).get("json_file")
    return f"dataset {name!r}" + (f" ({json_file})" if json_file else "")


def check_num_classes(cfg, dataset_names, role: str) -> None:
    """The model's category count equals each dataset's (datasets without thing_classes pass)."""
    key, num = num_classes_key(cfg)
    for name in dataset_names:
        ensure_dataset_metadata(name)
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num:
            consequence = (
                f"its last {len(classes) - num} categories would be trained as background"
                if len(classes) > num
                else f"the evaluator cannot map the model's classes {len(classes)}..{num - 1} back to categories"
            )
            raise ValueError(
                f"{key} is {num} but {role} {_describe(name)} has {len(classes)} categories: {consequence}. "
                f"Set {key} {len(classes)}."
            )


def check_training_dicts(cfg, dataset_dicts: list[dict]) -> None:
    """Mask annotations fit the mask head: present on every annotation, polygons unless bitmask."""
    if not cfg.MODEL.MASK_ON:
        return
    polygon = cfg.INPUT.MASK_FORMAT == "polygon"
    missing, not_polygon, num_anns = [], [], 0
    for d in dataset_dicts:
        for a in d.get("annotations", ()):
            if a.get("iscrowd", 0):
                continue  # the mapper drops crowd annotations
            num_anns += 1
            segm = a.get("segmentation")
            if segm is None:
                missing.append(d.get("image_id"))
            elif polygon and not isinstance(segm, list):
                not_polygon.append(d.get("image_id"))
    names = ", ".join(cfg.DATASETS.TRAIN)
    if missing:
        raise ValueError(
            f"MODEL.MASK_ON is True but {len(missing)} of {num_anns} training annotations of {names} have no "
            f"'segmentation' (image ids {name_some(dict.fromkeys(missing))}): add masks, or train boxes only "
            "with MODEL.MASK_ON False (Faster R-CNN)"
        )
    if not_polygon:
        raise ValueError(
            f"INPUT.MASK_FORMAT is 'polygon' but {len(not_polygon)} training annotations of {names} have RLE "
            f"(or bitmap) segmentation (image ids {name_some(dict.fromkeys(not_polygon))}): set "
            "INPUT.MASK_FORMAT bitmask (it takes polygons and RLE)"
        )


def check_evaluation_datasets(cfg) -> None:
    """What the evaluation after training needs from DATASETS.TEST, checked before training."""
    for name in cfg.DATASETS.TEST:
        ensure_dataset_metadata(name)
        meta = MetadataCatalog.get(name)
        evaluator_type = meta.get("evaluator_type")
        if evaluator_type not in ("lvis", "coco"):
            continue  # build_evaluator reports it when the evaluation runs
        check_num_classes(cfg, [name], "DATASETS.TEST")
        if evaluator_type != "lvis":
            continue
        if any(f not in FREQUENCIES for f in meta.get("category_frequencies") or ()):
            check_lvis_frequencies(meta.json_file)  # raises, naming the json and categories
        lacking = meta.get("annotations_lacking") or {}
        needed = {"area": "LVIS evaluation (its small/medium/large ranges) reads from the json: add it "
                          "(the mask's area, or the box's width x height)"}
        if cfg.MODEL.MASK_ON:
            needed["segmentation"] = ("mask evaluation reads from the json: add masks, or evaluate boxes only with "
                                      "MODEL.MASK_ON False")
        for key, why in needed.items():
            if key in lacking:
                count, first = lacking[key]
                raise ValueError(f"DATASETS.TEST {_describe(name)}: {count} annotations lack '{key}' (annotation ids "
                                 f"{name_some(first, count)}), which {why}")
