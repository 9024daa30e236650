"""The box predictor chosen by MODEL.ROI_BOX_HEAD.CLS_LOSS, and the RoI heads that build it.

    softmax_ce   detectron2's FastRCNNOutputLayers as configured (the default: nothing changes)
    sigmoid_bce  detectron2's FastRCNNOutputLayers with its sigmoid cross-entropy (USE_SIGMOID_CE)
    federated    detectron2's federated loss (USE_SIGMOID_CE + USE_FED_LOSS, its own code), sampling
                 negatives by image_count ** FED_LOSS_FREQ_WEIGHT_POWER of the training set
    eqlv2, seesaw, ecm   LongTailOutputLayers with the loss of drcl_d2.modeling.classification_losses

Class frequencies (federated's sampling weights, ECM's margins) are the training set's image counts
from CategoryStatistics, the statistics Dynamic Rebalancing uses. They are read from the training
set before the first loss of every run (not when the model is built: evaluation and config checks
need no training data) into a non-persistent buffer: a checkpoint never brings another set's counts.

`LongTailROIHeads` / `LongTailCascadeROIHeads` (ROI_HEADS_REGISTRY) are detectron2's Standard /
Cascade RoI heads with this predictor; drcl_d2's configs name them. With softmax_ce they build
exactly detectron2's heads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats

from .classification_losses import CLS_LOSSES

__all__ = ["CLS_LOSS_NAMES", "provide_class_image_counts", "ReadsClassImageCounts", "LongTailOutputLayers", "FederatedOutputLayers", "NormedLinear",
           "build_box_predictor", "check_roi_heads_read_cls_loss", "LongTailROIHeads", "LongTailCascadeROIHeads"]

DETECTRON2_LOSSES = ("softmax_ce", "sigmoid_bce", "federated")
CLS_LOSS_NAMES = DETECTRON2_LOSSES + tuple(CLS_LOSSES)


def class_image_counts_of(dataset_dicts: list[dict], num_classes: int) -> torch.Tensor:
    """Images of each class in a training list, from CategoryStatistics. (num_classes,) float64;
    a class without images counts 0."""
    from ..data.rebalance import CategoryStatistics  # data imports modeling's registrations lazily

    stats = CategoryStatistics.from_dataset_dicts(dataset_dicts)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    counts[torch.as_tensor(stats.category_ids)] = torch.as_tensor(stats.image_counts, dtype=torch.float64)
    return counts


def training_class_image_counts(cfg) -> torch.Tensor:
    """class_image_counts_of DATASETS.TRAIN after the loader's filtering (parses the jsons: the
    trainer hands its own list over instead, see provide_class_image_counts)."""
    from ..data.build import build_train_dataset

    return class_image_counts_of(build_train_dataset(cfg), cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def provide_class_image_counts(model: nn.Module, dataset_dicts: list[dict], num_classes: int) -> None:
    """Give the predictors that read class frequencies the counts of the trainer's training list,
    so that the first loss does not parse the training json a second time (LVIS v1: ~45 s, 3 GB)."""
    predictors = [m for m in model.modules() if isinstance(m, ReadsClassImageCounts) and m.class_image_counts_source]
    if predictors:
        counts = class_image_counts_of(dataset_dicts, num_classes)
        for m in predictors:
            m.use_class_image_counts(counts)


class ReadsClassImageCounts:
    """A box predictor whose loss reads the training set's images per class (federated, ECM), once,
    at its first loss, from ``class_image_counts_source`` (() -> (C,) tensor; from_config: a parse of
    DATASETS.TRAIN, replaced by the trainer's own list through use_class_image_counts)."""

    class_image_counts_source: Callable[[], torch.Tensor] | None = None

    def use_class_image_counts(self, counts: torch.Tensor) -> None:
        """Read these counts (C,) instead of the source's."""
        self.class_image_counts_source = lambda: counts

    def read_class_image_counts(self, what: str) -> torch.Tensor:
        if self.class_image_counts_source is None:
            raise RuntimeError(f"{what} needs the training set's class image counts: pass class_image_counts")
        return self.class_image_counts_source()


class NormedLinear(nn.Linear):
    """Cosine classifier: z = s · (x / ‖x‖) · (W_j / ‖W_j‖) + b_j (Seesaw's normalised linear
    activation for LVIS, scale s = 20)."""

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__(in_features, out_features)
        self.scale = scale
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, out)
        return F.linear(self.scale * F.normalize(x, dim=1), F.normalize(self.weight, dim=1), self.bias)


class LongTailOutputLayers(ReadsClassImageCounts, FastRCNNOutputLayers):
    """FastRCNNOutputLayers whose classifier width, classification loss and scores are those of a
    long-tail loss (EQLv2, Seesaw, ECM); box regression is detectron2's."""

    @configurable
    def __init__(self, input_shape, *, cls_loss: nn.Module, normed_linear_scale: float = 0.0,
                 class_image_counts: Callable[[], torch.Tensor] | None = None, **kwargs):
        """
        cls_loss: a loss of drcl_d2.modeling.classification_losses.
        normed_linear_scale: > 0 makes the classifier a NormedLinear of this scale (Seesaw on LVIS).
        class_image_counts: returns the training set's images per class, for losses that need them.
        Other arguments: FastRCNNOutputLayers'.
        """
        super().__init__(input_shape, **kwargs)
        self.cls_loss = cls_loss
        in_features, out_features = self.cls_score.in_features, cls_loss.num_logits(self.num_classes)
        if normed_linear_scale > 0:
            self.cls_score = NormedLinear(in_features, out_features, normed_linear_scale)
        else:
            self.cls_score = nn.Linear(in_features, out_features)
            nn.init.normal_(self.cls_score.weight, std=0.01)  # as detectron2 initialises it
            nn.init.constant_(self.cls_score.bias, 0)
        self.class_image_counts_source = class_image_counts

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        name = cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS
        loss_cls = CLS_LOSSES[name]
        ret["cls_loss"] = loss_cls(cfg.MODEL.ROI_HEADS.NUM_CLASSES, **loss_cls.from_config(cfg))
        if name == "seesaw" and cfg.MODEL.ROI_BOX_HEAD.SEESAW.NORMED_LINEAR:
            ret["normed_linear_scale"] = cfg.MODEL.ROI_BOX_HEAD.SEESAW.SCALE
        if getattr(loss_cls, "needs_class_image_counts", False):
            ret["class_image_counts"] = lambda: training_class_image_counts(cfg)
        return ret

    def losses(self, predictions, proposals):
        """{loss_cls (+ loss_cls_objectness for Seesaw), loss_box_reg} of the sampled proposals."""
        logits, proposal_deltas = predictions  # (N, num_logits), (N, K*4 or 4)
        if getattr(self.cls_loss, "has_class_image_counts", True) is False:  # once per run (ECM)
            self.cls_loss.set_class_image_counts(self.read_class_image_counts(type(self.cls_loss).__name__))
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)  # (N,), C = background
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)  # (N, 4)
            # Images without ground truth have no gt_boxes; their proposals are all background.
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals])
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=logits.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=logits.device)
        _log_classification_stats(self.cls_loss.scores(logits.detach()), gt_classes)
        losses = self.cls_loss(logits, gt_classes)
        losses["loss_box_reg"] = self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals):
        """Per image, (R_i, C+1) scores as the loss's paper evaluates them, background last."""
        logits, _ = predictions
        return self.cls_loss.scores(logits).split([len(p) for p in proposals], dim=0)


class FederatedOutputLayers(ReadsClassImageCounts, FastRCNNOutputLayers):
    """detectron2's federated loss (Zhou et al., 2021) unchanged, with its sampling weights taken from
    the training set (CategoryStatistics) instead of LVIS metadata: image_count ** power."""

    @configurable
    def __init__(self, input_shape, *, class_image_counts: Callable[[], torch.Tensor] | None = None,
                 freq_weight_power: float = 0.5, **kwargs):
        num_classes = kwargs["num_classes"]
        # Placeholder weights (all zero = unset), filled from the training set before the first loss.
        super().__init__(input_shape, use_sigmoid_ce=True, use_fed_loss=True,
                         get_fed_loss_cls_weights=lambda: torch.zeros(num_classes), **kwargs)
        # Re-registered non-persistent: read from this run's training set, never from a checkpoint.
        self.register_buffer("fed_loss_cls_weights", self.fed_loss_cls_weights, persistent=False)
        self.has_class_image_counts = False
        self.class_image_counts_source = class_image_counts
        self.freq_weight_power = freq_weight_power

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        for key in ("use_fed_loss", "use_sigmoid_ce", "get_fed_loss_cls_weights"):
            del ret[key]
        ret["class_image_counts"] = lambda: training_class_image_counts(cfg)
        ret["freq_weight_power"] = cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER
        return ret

    def sigmoid_cross_entropy_loss(self, pred_class_logits, gt_classes):
        if not self.has_class_image_counts:  # once per run
            counts = self.read_class_image_counts("federated loss")
            self.fed_loss_cls_weights.copy_(counts.to(self.fed_loss_cls_weights) ** self.freq_weight_power)
            # detectron2 draws its negatives without replacement from classes of non-zero weight: a
            # dataset with fewer such classes than FED_LOSS_NUM_CLASSES (small sets) keeps them all.
            self.fed_loss_num_classes = min(self.fed_loss_num_classes, int((counts > 0).sum()))
            self.has_class_image_counts = True
        return super().sigmoid_cross_entropy_loss(pred_class_logits, gt_classes)


def check_cls_loss_config(cfg) -> str:
    """MODEL.ROI_BOX_HEAD.CLS_LOSS, after checking that detectron2's own loss switches do not say
    something else (they are what CLS_LOSS sets)."""
    head = cfg.MODEL.ROI_BOX_HEAD
    name = head.CLS_LOSS
    if name not in CLS_LOSS_NAMES:
        raise ValueError(f"Unknown MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r}; expected one of {CLS_LOSS_NAMES}")
    if name != "softmax_ce" and (head.USE_SIGMOID_CE or head.USE_FED_LOSS):
        raise ValueError(f"MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r} chooses the loss: leave USE_SIGMOID_CE and "
                         "USE_FED_LOSS False (CLS_LOSS sigmoid_bce / federated are detectron2's)")
    return name


def check_roi_heads_read_cls_loss(cfg) -> None:
    """A CLS_LOSS other than softmax_ce needs RoI heads that build this predictor: detectron2's own
    StandardROIHeads would train with softmax CE and say nothing."""
    name = check_cls_loss_config(cfg)
    heads = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    if name != "softmax_ce" and not issubclass(heads, (LongTailROIHeads, LongTailCascadeROIHeads)):
        raise ValueError(f"MODEL.ROI_BOX_HEAD.CLS_LOSS {name!r} is read by MODEL.ROI_HEADS.NAME 'LongTailROIHeads' "
                         f"or 'LongTailCascadeROIHeads'; {cfg.MODEL.ROI_HEADS.NAME!r} would ignore it")


def build_box_predictor(cfg, input_shape, **overrides) -> nn.Module:
    """The box predictor of MODEL.ROI_BOX_HEAD.CLS_LOSS. `overrides`: constructor arguments that
    the RoI heads set themselves (Cascade's per-stage box2box_transform)."""
    name = check_cls_loss_config(cfg)
    if name == "softmax_ce":
        return FastRCNNOutputLayers(cfg, input_shape, **overrides)
    if name == "sigmoid_bce":
        return FastRCNNOutputLayers(cfg, input_shape, use_sigmoid_ce=True, **overrides)
    if name == "federated":
        return FederatedOutputLayers(cfg, input_shape, **overrides)
    return LongTailOutputLayers(cfg, input_shape, **overrides)


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads with the box predictor of MODEL.ROI_BOX_HEAD.CLS_LOSS."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if check_cls_loss_config(cfg) != "softmax_ce":  # softmax_ce: detectron2's predictor as built
            ret["box_predictor"] = build_box_predictor(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(CascadeROIHeads):
    """CascadeROIHeads with the box predictor of MODEL.ROI_BOX_HEAD.CLS_LOSS in every stage (each
    stage keeps its own loss statistics)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if check_cls_loss_config(cfg) != "softmax_ce":
            ret["box_predictors"] = [
                build_box_predictor(cfg, head.output_shape, box2box_transform=old.box2box_transform)
                for head, old in zip(ret["box_heads"], ret["box_predictors"])
            ]
        return ret
