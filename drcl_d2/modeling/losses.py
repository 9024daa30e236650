"""Loss functions named after the papers' equations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "info_nce_with_batch_negatives", "l2_normalized_mse", "spatially_normalized_mse",
           "same_image_mask"]


def same_image_mask(query_ids: torch.Tensor | None, key_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(N, K) True where key k comes from query n's image (ids: (N,), (K,) int64; -1 = no image,
    e.g. a queue slot still holding its random initial key). None when either side has no ids."""
    if query_ids is None or key_ids is None:
        return None
    return (query_ids[:, None] == key_ids[None, :]) & (query_ids[:, None] >= 0)


def info_nce(query: torch.Tensor, positive_key: torch.Tensor, queue: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_i exp(q·k_i/τ)), averaged over the batch.

    query (N, D) and positive_key (N, D) are L2-normalised; queue (K, D) holds the negatives
    (detached). The positive sits at logit index 0, as in MoCo. exclude (N, K) bool removes
    queue keys from a query's sum: a stale key of the query's own image is not a negative.
    """
    positive = (query * positive_key).sum(dim=1, keepdim=True)  # (N, 1)
    negatives = query @ queue.detach().t()  # (N, K)
    if exclude is not None:
        negatives = negatives.masked_fill(exclude, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / temperature  # (N, 1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def info_nce_with_batch_negatives(query: torch.Tensor, keys: torch.Tensor, positive_index: torch.Tensor,
                                  queue: torch.Tensor, temperature: float,
                                  exclude_keys: torch.Tensor | None = None,
                                  exclude_queue: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE where query i's positive is keys[positive_index[i]], its negatives every other key
    and the queue.

    query (M, D) L2-normalised boxes of this rank; keys (M_all, D) the target keys of the whole
    batch (all ranks); queue (K, D). Used by the box-level LCL term: the other boxes of the
    batch are negatives on top of the queued ones. exclude_keys (M, M_all) / exclude_queue (M, K)
    bool remove keys from the negatives (keys of the query's own image); never the positive.
    """
    if query.shape[0] == 0:
        return query.sum() * 0.0
    batch_logits = query @ keys.detach().t()  # (M, M_all)
    queue_logits = query @ queue.detach().t()  # (M, K)
    if exclude_keys is not None:
        batch_logits = batch_logits.masked_fill(exclude_keys, float("-inf"))
    if exclude_queue is not None:
        queue_logits = queue_logits.masked_fill(exclude_queue, float("-inf"))
    logits = torch.cat([batch_logits, queue_logits], dim=1) / temperature  # (M, M_all+K)
    return F.cross_entropy(logits, positive_index)


def l2_normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ||n(pred) - n(target)||², n = L2 normalisation over channels (dim 1).

    pred, target (N, C, H, W). Equals 2 - 2·cos per position, so it is bounded in [0, 4].
    """
    pred = F.normalize(pred, dim=1)
    target = F.normalize(target.detach(), dim=1)
    return (pred - target).pow(2).sum(dim=1).mean()


def spatially_normalized_mse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean over channels and positions of (s(pred) - s(target))², s = per-image, per-channel
    standardisation over space (zero mean, unit variance over H×W; instance norm without affine).

    pred, target (N, C, H, W). Equals 2 - 2·(mean over channels of the spatial correlation), so it is
    bounded in [0, 4] and cannot be lowered by adding a constant to a channel or rescaling a map:
    the shortcut that channel-wise L2 normalisation leaves open (SPEC §7).
    """
    pred = F.instance_norm(pred, eps=eps)
    target = F.instance_norm(target.detach(), eps=eps)
    return (pred - target).pow(2).mean()
