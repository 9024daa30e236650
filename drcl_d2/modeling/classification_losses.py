"""Long-tail classification losses of the Fast R-CNN box predictor: EQLv2, Seesaw, ECM.

Each loss is one module holding what it needs between steps (buffers, so they go into the
detectron2 checkpoint and a resume continues bit for bit), with three things the box predictor
(drcl_d2.modeling.box_predictor) asks of it:
    num_logits(C)                the classifier's output width for C foreground classes
    forward(logits, gt_classes)  dict of named losses; gt_classes in [0, C], C = background
    scores(logits)               (N, C+1) scores as the paper evaluates them, background last

Formulas (C foreground classes, N sampled RoIs, z the logits, y the one-hot targets):
    EQLv2   L = 1/N Σ_i Σ_j w_ij BCE(z_ij, y_ij),  w_ij = y_ij q_j + (1 − y_ij) r_j,
            r_j = f(g_j) = 1 / (1 + exp(−γ (g_j − μ))),  q_j = 1 + α (1 − r_j),
            g_j = accumulated positive / negative |∂L/∂z_j| (weighted) over all past steps.
    Seesaw  L = −1/N Σ_{i fg} log( e^{z_i,y} / (e^{z_i,y} + Σ_{j≠y} S_yj e^{z_ij}) ) + objectness CE,
            S_yj = M_yj C_yj,  M_yj = (n_j / n_y)^p if n_j < n_y else 1   (n: cumulative counts),
            C_yj = (σ_j / σ_y)^q if σ_j > σ_y else 1                     (σ: softmax, detached).
    ECM     L = 1/N Σ_i Σ_j w_j BCE(2 z_ij + m⁺_j − m⁻_j, y_ij),  with n⁺_j the training images of j
            (background: FG_BG_RATIO · Σ n⁺), n⁻_j = Σ n − n⁺_j, m⁺_j = log(1 + (n⁺_j/n⁻_j)^¼),
            m⁻_j = log(1 + (n⁻_j/n⁺_j)^¼), w_j = a_j log(1 + 1/a_j), a_j = n⁻_j / n⁺_j.

Statistics that depend on the batch (EQLv2's gradients, Seesaw's counts) are summed over ranks
before use: a 2-process run equals a 1-process run with the same global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from detectron2.utils import comm

__all__ = ["CLS_LOSSES", "EQLv2Loss", "SeesawLoss", "ECMLoss", "sigmoid_scores_with_objectness"]


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over all ranks in place (no-op on one process)."""
    if comm.get_world_size() > 1:
        assert tensor.is_contiguous(), "all_reduce reads the storage: reduce a contiguous tensor"
        dist.all_reduce(tensor)
    return tensor


def sigmoid_scores_with_objectness(logits: torch.Tensor) -> torch.Tensor:
    """Scores of the sigmoid losses with an objectness column (EQLv2, ECM inference):
    p_j = σ(z_j) · (1 − σ(z_bg)) for foreground j, σ(z_bg) for the background. (N, C+1)."""
    probs = logits.sigmoid()
    return torch.cat([probs[:, :-1] * (1 - probs[:, -1:]), probs[:, -1:]], dim=1)


class SigmoidWithObjectness(nn.Module):
    """Per-class sigmoid losses over C class logits and a background (objectness) logit, scored
    at inference as their papers do (EQLv2, ECM)."""

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes + 1  # C classes + the objectness (background) column

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return sigmoid_scores_with_objectness(logits)


class EQLv2Loss(SigmoidWithObjectness):
    """Equalization Loss v2 (Tan et al., CVPR 2021): per-class sigmoid BCE whose positive and
    negative terms are reweighted by each class's accumulated positive/negative gradient ratio."""

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0):
        """gamma, mu: slope and centre of the mapping f(g); alpha: how much positives gain."""
        super().__init__()
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        # Accumulated |∂L/∂z_j| over positives / negatives of class j (float64: 180k steps of sums).
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        # Steps accumulated so far; before the first one every weight is 1 (nothing is known yet).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg) -> dict:
        c = cfg.MODEL.ROI_BOX_HEAD.EQLV2
        return {"gamma": c.GAMMA, "mu": c.MU, "alpha": c.ALPHA}

    def class_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, r): weights of positive and negative terms per column, (C+1,) each, float64.
        The background column always weighs 1."""
        ones = torch.ones(self.num_classes + 1, dtype=torch.float64, device=self.pos_grad.device)
        ratio = self.pos_grad / (self.neg_grad + 1e-10)  # g_j
        neg_w = torch.sigmoid(self.gamma * (ratio - self.mu))  # r_j = f(g_j)
        pos_w = 1 + self.alpha * (1 - neg_w)  # q_j
        started = self.num_updates > 0  # a tensor test: no host sync per step
        return (torch.where(started, torch.cat([pos_w, ones[:1]]), ones),
                torch.where(started, torch.cat([neg_w, ones[:1]]), ones))

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        num_rois = logits.shape[0]
        target = F.one_hot(gt_classes, self.num_classes + 1).to(logits.dtype)  # (N, C+1)
        pos_w, neg_w = (w.to(logits.dtype) for w in self.class_weights())
        weight = target * pos_w + (1 - target) * neg_w  # (N, C+1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (bce * weight).sum() / max(num_rois, 1)
        self._accumulate_gradients(logits.detach(), target, weight)
        return {"loss_cls": loss}

    @torch.no_grad()
    def _accumulate_gradients(self, logits, target, weight) -> None:
        """pos_grad_j += Σ_i y_ij w_ij |σ(z_ij) − 1|, neg_grad_j += Σ_i (1−y_ij) w_ij σ(z_ij), over
        the global batch (the objectness column is not a class and collects nothing)."""
        prob = logits.sigmoid()
        grad = target * (1 - prob) + (1 - target) * prob  # |∂BCE/∂z|, (N, C+1)
        grad = (grad * weight).to(torch.float64)  # summed in float64: 1 or 2 ranks give the same sums
        both = torch.stack([(grad * target).sum(0), (grad * (1 - target)).sum(0)])[:, :-1]  # (2, C)
        both = all_reduce_sum(both.contiguous())  # (a strided view would be reduced wrongly)
        self.pos_grad += both[0]
        self.neg_grad += both[1]
        self.num_updates += 1


class SeesawLoss(nn.Module):
    """Seesaw Loss (Wang et al., CVPR 2021): softmax CE over the foreground classes of positive RoIs
    whose negative terms are scaled by S = mitigation × compensation, plus a 2-way objectness CE."""

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        """p: mitigation exponent; q: compensation exponent; eps: floor of σ_y in σ_j / σ_y."""
        super().__init__()
        self.num_classes, self.p, self.q, self.eps = num_classes, p, q, eps
        # n_j: positive RoIs of class j seen so far, all ranks (int64: exact at any schedule).
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg) -> dict:
        c = cfg.MODEL.ROI_BOX_HEAD.SEESAW
        return {"p": c.P, "q": c.Q, "eps": c.EPS}

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes + 2  # C classes, then objectness (foreground, background)

    @torch.no_grad()
    def _accumulate_counts(self, fg_classes: torch.Tensor) -> None:
        counts = torch.bincount(fg_classes, minlength=self.num_classes)
        self.class_counts += all_reduce_sum(counts)

    def seesaw_factors(self, class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """S_yj = M_yj · C_yj for P positive RoIs with labels y. (P, C)."""
        counts = self.class_counts.clamp(min=1).to(torch.float64)
        ratio = (counts[None, :] / counts[labels][:, None]).to(class_logits.dtype)  # n_j / n_y, (P, C)
        mitigation = torch.where(ratio < 1, ratio.pow(self.p), torch.ones_like(ratio))
        probs = F.softmax(class_logits.detach(), dim=1)
        own = probs.gather(1, labels[:, None]).clamp(min=self.eps)  # σ_y, (P, 1)
        score_ratio = probs / own  # σ_j / σ_y
        compensation = torch.where(score_ratio > 1, score_ratio.pow(self.q), torch.ones_like(score_ratio))
        return mitigation * compensation

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        num_rois, c = max(logits.shape[0], 1), self.num_classes
        is_fg = gt_classes < c
        labels = gt_classes[is_fg]  # (P,)
        self._accumulate_counts(labels)  # this batch counts too (as the paper's cumulative n)
        class_logits = logits[is_fg, :c]  # (P, C)
        # Σ_{j≠y} S_yj e^{z_j} = Σ_{j≠y} e^{z_j + log S_yj}: CE on shifted logits (target unshifted).
        not_target = 1 - F.one_hot(labels, c).to(logits.dtype)
        shifted = class_logits + self.seesaw_factors(class_logits, labels).log() * not_target
        loss_classes = F.cross_entropy(shifted, labels, reduction="sum") / num_rois
        objectness_labels = (~is_fg).long()  # 0 foreground, 1 background
        loss_objectness = F.cross_entropy(logits[:, c:], objectness_labels, reduction="sum") / num_rois
        return {"loss_cls": loss_classes, "loss_cls_objectness": loss_objectness}

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """p_j = softmax(z_classes)_j · P(foreground), background P(background). (N, C+1)."""
        c = self.num_classes
        classes = F.softmax(logits[:, :c], dim=1)
        objectness = F.softmax(logits[:, c:], dim=1)  # (N, 2): foreground, background
        return torch.cat([classes * objectness[:, :1], objectness[:, 1:]], dim=1)


class ECMLoss(SigmoidWithObjectness):
    """Effective Class-Margin loss (Cho & Krähenbühl, ECCV 2022): per-class sigmoid BCE with margins
    and class weights derived from the training set's image counts (no state learnt in training)."""

    needs_class_image_counts = True

    def __init__(self, num_classes: int, fg_bg_ratio: float = 6.3313):
        """fg_bg_ratio: background "images" per foreground image-count, the paper's empirical
        background frequency of Mask R-CNN's sampled RoIs."""
        super().__init__()
        self.num_classes, self.fg_bg_ratio = num_classes, fg_bg_ratio
        # n⁺_j: training images of class j (CategoryStatistics), set by the predictor before the first
        # loss of every run. Not in the checkpoint: a property of the training set, so a model
        # fine-tuned again on another set never keeps stale counts.
        self.register_buffer("class_image_counts", torch.zeros(num_classes, dtype=torch.float64), persistent=False)
        self.has_class_image_counts = False

    def set_class_image_counts(self, counts: torch.Tensor) -> None:
        """n⁺: (C,) training images per class."""
        self.class_image_counts.copy_(counts.to(self.class_image_counts))
        self.has_class_image_counts = True

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"fg_bg_ratio": cfg.MODEL.ROI_BOX_HEAD.ECM.FG_BG_RATIO}

    def margins_and_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(m⁺, m⁻, w) per column, background last, (C+1,) each, float64. A class absent from the
        training set counts as 1 image (its margins stay finite; it only ever meets negatives)."""
        if not self.has_class_image_counts:
            raise RuntimeError("ECM needs the training set's class image counts before its first loss")
        n_fg = self.class_image_counts.clamp(min=1)
        n_pos = torch.cat([n_fg, n_fg.sum()[None] * self.fg_bg_ratio])
        n_neg = n_pos.sum() - n_pos
        m_pos = torch.log1p((n_pos / n_neg) ** 0.25)
        m_neg = torch.log1p((n_neg / n_pos) ** 0.25)
        a = n_neg / n_pos
        return m_pos, m_neg, a * torch.log1p(1 / a)

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> dict:
        num_rois = logits.shape[0]
        target = F.one_hot(gt_classes, self.num_classes + 1).to(logits.dtype)  # (N, C+1)
        m_pos, m_neg, weight = (t.to(logits.dtype) for t in self.margins_and_weights())
        # P(y=1) = e^{z+m⁺} / (e^{z+m⁺} + e^{−z+m⁻}) = σ(2z + m⁺ − m⁻)
        bce = F.binary_cross_entropy_with_logits(2 * logits + (m_pos - m_neg), target, reduction="none")
        return {"loss_cls": (bce * weight).sum() / max(num_rois, 1)}


# MODEL.ROI_BOX_HEAD.CLS_LOSS values implemented here (softmax_ce, sigmoid_bce and federated are
# detectron2's own FastRCNNOutputLayers; see drcl_d2.modeling.box_predictor).
CLS_LOSSES = {"eqlv2": EQLv2Loss, "seesaw": SeesawLoss, "ecm": ECMLoss}
