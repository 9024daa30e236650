"""A detector's features at the ground-truth boxes of dataset images resized as at test time: what
the kNN probe (:mod:`drcl_d2.tools.probe`) and the transfer-scale report (:mod:`drcl_d2.checkpoint.scale`)
both read."""
from __future__ import annotations

import torch

__all__ = ["box_head_features", "first_stage", "images_with_boxes", "test_time_mapper_with_boxes"]


def images_with_boxes(dataset_dicts) -> list[dict]:
    """The dataset dicts that have a non-crowd annotation, in order."""
    return [d for d in dataset_dicts if any(not a.get("iscrowd", 0) for a in d.get("annotations", ()))]


def test_time_mapper_with_boxes(cfg):
    """detectron2's DatasetMapper with the test-time resize (ResizeShortestEdge to MIN_SIZE_TEST /
    MAX_SIZE_TEST, no flip, no crop) that keeps the non-crowd boxes, which ``is_train=False`` drops:
    ``instances.gt_boxes`` in input pixels (clipped; empty ones dropped) and ``gt_classes``."""
    from detectron2.data import DatasetMapper

    kwargs = DatasetMapper.from_config(cfg, is_train=False)
    kwargs.update(is_train=True, use_instance_mask=False, use_keypoint=False, recompute_boxes=False)
    kwargs.pop("keypoint_hflip_indices", None)
    kwargs.pop("precomputed_proposal_topk", None)
    return DatasetMapper(**kwargs)


def first_stage(module):
    """Cascade R-CNN keeps one box head / predictor per stage: the first."""
    return module[0] if isinstance(module, torch.nn.ModuleList) else module


def box_head_features(roi_heads, features: dict, boxes: list) -> torch.Tensor | None:
    """(R, FC_DIM) box-head output ("fc7") at ``boxes`` (per image Boxes, input pixels) from the backbone
    ``features``; None for RoI heads without a box pooler and box head (e.g. C4's Res5ROIHeads)."""
    if getattr(roi_heads, "box_head", None) is None or not hasattr(roi_heads, "box_pooler"):
        return None
    pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)  # (R, C, S, S)
    return first_stage(roi_heads.box_head)(pooled).flatten(1)
