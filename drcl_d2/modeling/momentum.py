"""Momentum (target / key) networks, feature queues and cross-rank gathers.

Shared by 2DRCL (EMA target, BYOL/AlignDet style) and DetCo / MoCo v2 (momentum key encoder).
Each helper is small, runs under no_grad, and works on CPU (gloo) as on GPU (NCCL).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn

__all__ = ["concat_all_gather", "FeatureQueue", "copy_params", "momentum_update", "cosine_momentum"]


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N, ...) of every rank along dim 0, rank order -> (world*N, ...).

    All ranks must pass the same shape. No gradient flows through the gathered copies.
    """
    world = comm.get_world_size()
    if world == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def gather_variable(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """concat_all_gather for tensors whose first dimension differs across ranks (box embeddings).

    Returns the concatenation in rank order and each rank's count.
    """
    world = comm.get_world_size()
    if world == 1:
        return tensor, [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = concat_all_gather(size).tolist()
    padded = torch.zeros((max(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = concat_all_gather(padded)
    m = max(sizes)
    return torch.cat([gathered[r * m: r * m + n] for r, n in enumerate(sizes)], dim=0), sizes


class FeatureQueue(nn.Module):
    """A FIFO of L2-normalised embeddings (K, D) with a write pointer, both checkpointed buffers.

    The queue starts filled with random unit vectors (as MoCo does) so InfoNCE has K negatives
    from the first step; `num_filled` counts real keys written so far. `ids` (K,) holds the image id
    each key came from (-1: an initial random key, or a key enqueued without ids), so a loss can
    leave out the stale keys of a query's own image (SPEC §7: DRB repeats rare images).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (K,) image id per key

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write keys (N, D), already gathered from all ranks, at the pointer, wrapping around;
        ids (N,) the image id of each key (None: -1).

        Non-finite keys are never written: a diverging step must not poison the queue.
        """
        if keys.numel() == 0 or not torch.isfinite(keys).all():
            return
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        if ids.shape[0] != keys.shape[0]:
            raise ValueError(f"{keys.shape[0]} keys but {ids.shape[0]} ids")
        keys, ids = keys[-self.size:], ids[-self.size:]  # more keys than slots: the newest win
        n, p = keys.shape[0], int(self.ptr)
        idx = (torch.arange(n, device=keys.device) + p) % self.size
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ids[idx] = ids.to(self.ids.device, torch.long)
        self.ptr.fill_((p + n) % self.size)
        self.num_filled.fill_(min(self.size, int(self.num_filled) + n))

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}"


@torch.no_grad()
def copy_params(online: nn.Module, target: nn.Module) -> None:
    """target <- online (parameters and buffers); the target never receives gradients."""
    target.load_state_dict(online.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers (BN stats) are copied."""
    for p_o, p_t in zip(online.parameters(), target.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
    for b_o, b_t in zip(online.buffers(), target.buffers()):
        b_t.copy_(b_o)


def cosine_momentum(base: float, iteration: int, max_iter: int) -> float:
    """m(T) = 1 - (1 - base) * (cos(pi T / T_max) + 1) / 2: base at T=0, 1.0 at T=T_max (BYOL)."""
    progress = min(max(iteration / max(max_iter, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
