"""Momentum (target / key) networks, feature queues and cross-rank gathers.

Shared by 2DRCL (EMA target, BYOL/AlignDet style) and DetCo / MoCo v2 (momentum key encoder).
Each helper is small, runs under no_grad, and works on CPU (gloo) as on GPU (NCCL).
"""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn

QUEUE_SEED = 20210101  # initial queue keys: the same on every rank (FeatureQueue)

__all__ = ["concat_all_gather", "DetectorModules", "FeatureQueue", "MicroBatchAware", "PendingKeysCheckpoint", "write_keys", "copy_params",
           "MomentumUpdate", "momentum_update", "cosine_momentum"]


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


def write_keys(bank: torch.Tensor, bank_ids: torch.Tensor | None, ptr: torch.Tensor, num_filled: torch.Tensor,
               keys: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Write keys into Q stacked FIFO queues at their pointers, wrapping around; all on the device.

    bank (Q, K, D) and bank_ids (Q, K) the queues, ptr and num_filled (Q,) int64; keys (Q, N, D) and
    ids (Q, N) the new keys of each queue (bank_ids and ids None: queues that never hold ids, whose
    ids stay -1). Written in place, with no host read (no sync):
    - a queue whose N new keys are not all finite is left exactly as it was (keys, ids, pointer and
      count): a diverging step must not poison the queue (torch.where on a (Q,) finite mask);
    - more keys than slots (N > K): the newest K are written.
    """
    num_queues, size = bank.shape[:2]
    keys = keys[:, -size:]
    n = keys.shape[1]
    if n == 0:
        return
    finite = torch.isfinite(keys).flatten(1).all(dim=1)  # (Q,) bool
    # Slot of key j in queue q, as a row of the flattened (Q*K, D) bank: q*K + (ptr_q + j) % K.
    slots = (ptr[:, None] + _arange(n, ptr.device)).remainder_(size)  # (Q, N)
    if num_queues > 1:  # as rows of the flattened (Q*K, D) bank: q*K + slot
        slots = slots + torch.arange(0, num_queues * size, size, device=ptr.device)[:, None]
    rows = slots.flatten()  # (Q*N,)
    flat_keys = bank.view(-1, bank.shape[2])
    # A queue with a non-finite key gets its old values written back: unchanged, without a branch.
    old_keys = flat_keys.index_select(0, rows).view(num_queues, n, -1)  # (Q, N, D)
    flat_keys.index_copy_(0, rows, torch.where(finite[:, None, None], keys.to(bank.dtype), old_keys).flatten(0, 1))
    if bank_ids is not None:
        flat_ids = bank_ids.view(-1)
        old_ids = flat_ids.index_select(0, rows).view(num_queues, n)  # (Q, N)
        flat_ids.index_copy_(0, rows, torch.where(finite[:, None], ids[:, -size:].to(torch.long), old_ids).flatten())
    ptr.add_(finite, alpha=n).remainder_(size)  # + n where the keys were written
    num_filled.add_(finite, alpha=n).clamp_(max=size)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """torch.arange(n) on `device`, kept: batch sizes repeat every step (read only)."""
    return torch.arange(n, device=device)


_QUEUE_BUFFERS = ("keys", "ids", "ptr", "num_filled")


class DetectorModules(nn.Module):
    """A pretraining model's online modules under GeneralizedRCNN's attribute names (``backbone``,
    and for 2DRCL ``proposal_generator`` and ``roi_heads``): what MODEL.WEIGHTS loads into, by
    detectron2's key names. Holds the modules themselves, not copies."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


class PendingKeysCheckpoint:
    """For an nn.Module that holds pushed keys in `self._pending` until `_write_pending()`:
    state_dict() writes them first (a checkpoint holds every key pushed so far) and
    load_state_dict() drops them (the loaded queues supersede them)."""

    _pending: list

    def _write_pending(self) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._write_pending()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._pending = []
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FeatureQueue(PendingKeysCheckpoint, nn.Module):
    """A FIFO of L2-normalised embeddings (K, D) with a write pointer, both checkpointed buffers.

    The queue starts filled with random unit vectors (as MoCo does) so InfoNCE has K negatives
    from the first step; `num_filled` counts real keys written so far. `ids` (K,) holds the image id
    each key came from (-1: an initial random key, or a key enqueued without ids), so a loss can
    leave out the stale keys of a query's own image (SPEC §7: DRB repeats rare images).

    Writing is two steps, so that no loss needs a copy of the queue and the trainer decides when
    keys enter it (gradient accumulation):
    - `push(keys, ids)` holds a step's keys as pending; the queue is unchanged, so a loss of this
      step may keep using `keys` until its backward has run;
    - `flush()` writes the pending keys in push order (`write_keys`: on the device, no host sync;
      a batch with a non-finite key is never stored). The models call it at the start of their
      next forward.
    Pending keys are invisible to readers: reading a buffer (`queue.keys`, `.ids`, `.ptr`,
    `.num_filled`) or `state_dict()` flushes first, so every reader sees all pushed keys, as if
    they had been written at push time. (Reading between a forward and its backward therefore
    writes the queue under the loss: backward then stops with autograd's in-place error.)
    `enqueue` = push + flush. `on_read`, if set, is called on every buffer read: a model that
    holds pending keys for several stacked queues (DetCo) flushes them there.
    """

    def __init__(self, size: int, dim: int, seed_index: int = 0):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        self.size, self.dim = int(size), int(dim)
        # One policy for every queue: its initial keys depend on (QUEUE_SEED, seed_index) only, never
        # on the global RNG, so every rank starts with the same negatives. The trainer's DDP
        # (broadcast_buffers=False) does not sync buffers at construction, and detectron2 seeds
        # each rank differently.
        generator = torch.Generator().manual_seed(QUEUE_SEED + seed_index)
        keys = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", keys)  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (K,) image id per key
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.on_read = None  # () -> None, called before a buffer is read (see the class docstring)
        # Inside a step of gradient accumulation (after its first micro-batch) reads do not flush:
        # pushed keys wait for the step's end (MicroBatchAware).
        self.hold_pending = False

    def __getattr__(self, name: str):
        # Module keeps buffers outside __dict__, so every read of one comes here.
        if name in _QUEUE_BUFFERS and not self.__dict__.get("hold_pending"):
            state = self.__dict__
            if state.get("_pending"):
                self.flush()
            if state.get("on_read") is not None:
                state["on_read"]()
        return super().__getattr__(name)

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Hold keys (N, D), already gathered from all ranks, and ids (N,) (None: -1) for flush()."""
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        if ids.shape[0] != keys.shape[0]:
            raise ValueError(f"{keys.shape[0]} keys but {ids.shape[0]} ids")
        if keys.shape[0]:
            self._pending.append((keys.detach(), ids))

    @torch.no_grad()
    def flush(self) -> None:
        """Write the pending keys at the pointer (see write_keys)."""
        pending, self._pending = self._pending, []
        for keys, ids in pending:
            write_keys(self.keys[None], self.ids[None], self.ptr.view(1), self.num_filled.view(1),
                       keys[None], ids[None].to(self.ids.device))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write keys (N, D) and ids (N,) now: push + flush."""
        self.push(keys, ids)
        self.flush()

    @property
    def pending(self) -> int:
        """Number of pushed batches not written yet."""
        return len(self._pending)

    def _write_pending(self) -> None:
        self.flush()

    def _apply(self, fn, *args, **kwargs):
        self.flush()  # pending keys live on the old device
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}"


@torch.no_grad()
def copy_params(online: nn.Module, target: nn.Module) -> None:
    """target <- online (parameters and buffers); the target never receives gradients."""
    target.load_state_dict(online.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)


class MomentumUpdate:
    """target <- m * target + (1 - m) * online for the parameters of (online, target) module pairs;
    buffers (BN statistics) are copied. Three fused ops (torch._foreach_mul_, _foreach_add_,
    _foreach_copy_) over all tensors, instead of two ops per parameter and one per buffer; the
    arithmetic is the per-tensor `p_t.mul_(m).add_(p_o, alpha=1 - m)`, bit for bit.

    The tensor lists are built on the first call and kept; call `reset()` when the modules' tensors
    are replaced (Module.to / .cuda replace buffers: the models call it from their `_apply`).
    """

    def __init__(self, pairs):
        self._pairs = pairs  # () -> [(online module, target module), ...]
        self._tensors = None

    def reset(self) -> None:
        self._tensors = None

    def __deepcopy__(self, memo):
        # A copied model lists its own tensors: copy the module pairs, not the lists.
        return MomentumUpdate(copy.deepcopy(self._pairs, memo))

    def _lists(self):
        if self._tensors is None:
            p_o, p_t, b_o, b_t = [], [], [], []
            for online, target in self._pairs():
                p_o += list(online.parameters())
                p_t += list(target.parameters())
                b_o += list(online.buffers())
                b_t += list(target.buffers())
            if len(p_o) != len(p_t) or len(b_o) != len(b_t):
                raise ValueError("online and target modules differ in their parameters or buffers")
            self._tensors = (p_o, p_t, b_o, b_t)
        return self._tensors

    @torch.no_grad()
    def __call__(self, m: float) -> None:
        p_o, p_t, b_o, b_t = self._lists()
        torch._foreach_mul_(p_t, m)
        torch._foreach_add_(p_t, p_o, alpha=1.0 - m)
        if b_t:
            torch._foreach_copy_(b_t, b_o)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """One-off target <- m * target + (1 - m) * online (see MomentumUpdate, which keeps its lists)."""
    MomentumUpdate(lambda: [(online, target)])(m)


def cosine_momentum(base: float, iteration: int, max_iter: int) -> float:
    """m(T) = 1 - (1 - base) * (cos(pi T / T_max) + 1) / 2: base at T=0, 1.0 at T=T_max (BYOL)."""
    progress = min(max(iteration / max(max_iter, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MicroBatchAware:
    """For a pretraining model with queues: the gradient-accumulation protocol
    (drcl_d2.engine.accumulate). `accumulation` = (index of the coming micro-batch in its optimizer
    step, micro-batches per step); (0, 1) without accumulation. From the second micro-batch of a step
    on, the queues hold pushed keys back (reads do not flush), so every micro-batch of a step is
    contrasted with the queues as they were at the step's start; the trainer sets (0, k) after the
    optimizer step, and the next read or forward writes all of the step's keys, in batch order.
    """

    _accumulation = (0, 1)

    @property
    def accumulation(self) -> tuple[int, int]:
        return self._accumulation

    @accumulation.setter
    def accumulation(self, value) -> None:
        index, steps = (int(v) for v in value)
        if not 0 <= index < steps:
            raise ValueError(f"micro-batch index {index} outside a step of {steps}")
        self._accumulation = (index, steps)
        for module in self.modules():
            if isinstance(module, FeatureQueue):
                module.hold_pending = index != 0
