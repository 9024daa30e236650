"""DetCo (Xie et al., ICCV 2021) and its baseline MoCo v2, as one detectron2 meta-architecture.

    L = sum_{i in levels} w_i (L^i_{g<->g} + L^i_{l<->l} + L^i_{g<->l})

* g<->g: the query view's global embedding against the key view's (MoCo v2 at res5);
* l<->l: the query patch set's local embedding against the key patch set's;
* g<->l: the query patch set's local embedding against the key view's global embedding, with the
  global queue as negatives (no mirrored term);

each an InfoNCE with the positive at index 0 and the level's queue as negatives. MoCo v2 is this
model with LEVELS [res5] and LOCAL False (configs/pretrain/moco_v2_*.yaml): one code path.

As the official MoCo v2 the loss is not symmetrised: view 1 (``view_q``) is the query, view 2
(``view_k``) the key. The key encoder and key heads are updated by momentum inside ``forward``,
before the keys are computed; its batch is shuffled across ranks (Shuffle BN), the jigsaw patch
sets moving with their image, and both global and local keys are unshuffled before the losses.
In a single process Shuffle BN has nothing to shuffle across (official MoCo runs it only under
DDP): the model warns once and runs without it, it does not emulate it.

Launch cost (SPEC §7): the momentum update is three fused ops (MomentumUpdate); the 2·L queues
(L levels, a global and a local queue each) are views of one stacked bank (Q, K, D), written in one
device-side step and multiplied by all queries in one batched matmul; the 3·L InfoNCE terms are one
cross-entropy. A step's keys are pushed as pending and written at the start of the next forward
(`flush_queues`), after this step's backward has used the queues: no copy of the queues is needed.
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.utils import comm
from torch import nn

from ..data.detco_views import GRID, DetCoViewMapper
from .momentum import (DetectorModules, FeatureQueue, MicroBatchAware, MomentumUpdate, PendingKeysCheckpoint, concat_all_gather,
                       copy_params, write_keys)

__all__ = ["DetCo", "mlp_head"]

logger = logging.getLogger(__name__)

NUM_PATCHES = GRID * GRID  # 9 patches per jigsaw set (paper)


@functools.lru_cache(maxsize=16)
def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """InfoNCE's labels (n,) int64 zeros, kept per size (read only)."""
    return torch.zeros(n, dtype=torch.long, device=device)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's projection head: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@META_ARCH_REGISTRY.register()
class DetCo(MicroBatchAware, PendingKeysCheckpoint, nn.Module):
    """Query encoder + momentum key encoder, per-level global / local heads and queues."""

    @configurable
    def __init__(
        self,
        *,
        encoder: Backbone,
        levels: Sequence[str] = ("res2", "res3", "res4", "res5"),
        level_weights: Sequence[float] = (0.1, 0.4, 0.7, 1.0),
        local: bool = True,
        embed_dim: int = 128,
        local_hidden_dim: int = 0,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_bn: bool = True,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        depth: int | None = None,
    ):
        """
        Args:
            encoder: the query encoder, a detectron2 Backbone whose outputs include ``levels``.
            levels: encoder outputs with their own heads, queues and loss terms, e.g. ["res5"].
            level_weights: w_i of each level, in the order of ``levels``.
            local: the jigsaw branch (l<->l and g<->l terms); False is MoCo v2.
            embed_dim: output width of every head (128).
            local_hidden_dim: hidden width of the local heads; 0 = the level's channels C.
            queue_size: K, keys per queue (one global, one local queue per level).
            temperature: tau of InfoNCE.
            momentum: m of the key encoder update k <- m k + (1 - m) q.
            shuffle_bn: shuffle the key encoder's batch across ranks (Shuffle BN).
            pixel_mean, pixel_std: input normalisation, in the inputs' channel order.
            depth: ResNet depth, recorded in checkpoint_meta() only.
        """
        super().__init__()
        levels = tuple(levels)
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"MODEL.DETCO.LEVELS must name distinct encoder outputs, got {list(levels)}")
        if len(level_weights) != len(levels):
            raise ValueError(f"MODEL.DETCO.LEVEL_WEIGHTS {list(level_weights)} must give one weight per "
                             f"level of MODEL.DETCO.LEVELS {list(levels)}")
        shapes = encoder.output_shape()
        missing = [lvl for lvl in levels if lvl not in shapes]
        if missing:
            raise ValueError(f"MODEL.DETCO.LEVELS {missing} are not encoder outputs {sorted(shapes)}: "
                             "add them to MODEL.RESNETS.OUT_FEATURES")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MODEL.DETCO.MOMENTUM must be in [0, 1], got {momentum}")
        self.levels = levels
        self.level_weights = {lvl: float(w) for lvl, w in zip(levels, level_weights)}
        self.local = bool(local)
        self.temperature = float(temperature)  # tau
        self.momentum = float(momentum)  # m
        self.shuffle_bn = bool(shuffle_bn)
        self.depth = depth
        channels = {lvl: shapes[lvl].channels for lvl in levels}

        # Query encoder and heads (trained); key encoder and heads (momentum copies, no gradient).
        self.encoder_q = encoder
        self.global_heads_q = nn.ModuleDict(
            {lvl: mlp_head(c, c, embed_dim) for lvl, c in channels.items()})  # C -> C -> 128
        self.local_heads_q = nn.ModuleDict(
            {lvl: mlp_head(NUM_PATCHES * c, local_hidden_dim or c, embed_dim) for lvl, c in channels.items()}
            if self.local else {})  # 9C -> C -> 128
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.global_heads_k = copy.deepcopy(self.global_heads_q)
        self.local_heads_k = copy.deepcopy(self.local_heads_q)
        self.init_target()

        # Negative queues of past keys, K x 128 each, and their write pointers (checkpointed buffers).
        # Initial keys seeded by queue index (FeatureQueue): the same on every rank.
        self.queue_global = nn.ModuleDict(
            {lvl: FeatureQueue(queue_size, embed_dim, seed_index=2 * i) for i, lvl in enumerate(levels)})
        self.queue_local = nn.ModuleDict(
            {lvl: FeatureQueue(queue_size, embed_dim, seed_index=2 * i + 1) for i, lvl in enumerate(levels)}
            if self.local else {})
        self._pending: list[torch.Tensor] = []  # (Q, N_global, D) per pushed step
        self._link_queues()
        self._momentum_update = MomentumUpdate(self._key_modules)
        self._term_weights = None  # ((w_level, ...), (Q, 2) tensor): see _loss_weights
        self._warned_shuffle_bn = False

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
            raise ValueError("DetCo / MoCo v2 train the whole encoder: set MODEL.BACKBONE.FREEZE_AT 0")
        d = cfg.MODEL.DETCO
        return {
            "encoder": build_resnet_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))),
            "levels": d.LEVELS,
            "level_weights": d.LEVEL_WEIGHTS,
            "local": d.LOCAL,
            "embed_dim": d.EMBED_DIM,
            "local_hidden_dim": d.LOCAL_HIDDEN_DIM,
            "queue_size": d.QUEUE_SIZE,
            "temperature": d.TEMPERATURE,
            "momentum": d.MOMENTUM,
            "shuffle_bn": d.SHUFFLE_BN,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "depth": cfg.MODEL.RESNETS.DEPTH,
        }

    @classmethod
    def build_mapper(cls, cfg, dataset_dicts: list[dict]):
        """The pretraining loader's mapper (PretrainTrainer): two views and, for DetCo, two patch sets."""
        return DetCoViewMapper(cfg), dataset_dicts

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def method(self) -> str:
        """"moco_v2" for one level without the local branch, else "detco"."""
        return "detco" if self.local or len(self.levels) > 1 else "moco_v2"

    def checkpoint_meta(self) -> dict:
        """The top-level ``"drcl_d2"`` entry of a checkpoint, read by drcl-convert."""
        return {"method": self.method, "depth": self.depth}

    def online_network(self) -> nn.Module:
        """The module MODEL.WEIGHTS is loaded into: ``.backbone`` is the query encoder."""
        return DetectorModules(backbone=self.encoder_q)

    def _key_modules(self):
        return ((self.encoder_q, self.encoder_k), (self.global_heads_q, self.global_heads_k),
                (self.local_heads_q, self.local_heads_k))

    def _apply(self, fn, *args, **kwargs):
        self.flush_queues()  # pending keys live on the old device
        super()._apply(fn, *args, **kwargs)
        # .to() / .cuda() replace each buffer by its own copy: re-stack the queues, re-list the tensors.
        self._link_queues()
        self._momentum_update.reset()
        self._term_weights = None
        return self

    def compile_step(self, mode: str = "default") -> None:
        """torch.compile the encoders and heads in place (PRETRAIN.COMPILE): names, state_dict and
        parameters unchanged; the queue and momentum steps stay eager (they are a few ops)."""
        for module in (self.encoder_q, self.encoder_k, *self.global_heads_q.values(), *self.global_heads_k.values(),
                       *self.local_heads_q.values(), *self.local_heads_k.values()):
            module.compile(mode=mode)

    @torch.no_grad()
    def init_target(self) -> None:
        """Key encoder and heads <- query encoder and heads (construction, and after MODEL.WEIGHTS)."""
        for q, k in self._key_modules():
            copy_params(q, k)

    # ------------------------------------------------------------------------------------------
    # MoCo's named mechanisms

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """k <- m k + (1 - m) q for the key encoder and key heads (BN buffers copied)."""
        self._momentum_update(self.momentum)

    def _queues(self) -> list[FeatureQueue]:
        """The queues in bank order: per level its global queue, then its local one (DetCo)."""
        return [q for lvl in self.levels
                for q in ((self.queue_global[lvl], self.queue_local[lvl]) if self.local else (self.queue_global[lvl],))]

    @torch.no_grad()
    def _link_queues(self) -> None:
        """Stack the queues' buffers into one bank (keys (Q, K, D), ids (Q, K), ptr and num_filled
        (Q,)) and make each queue's buffers views of its row: the checkpoint keeps its per-queue
        names (queue_global.res5.keys, ...), the step writes and reads all queues at once."""
        queues = self._queues()
        self._bank = tuple(torch.stack([getattr(q, name) for q in queues])
                           for name in ("keys", "ids", "ptr", "num_filled"))
        for i, q in enumerate(queues):
            q.keys, q.ids, q.ptr, q.num_filled = (b[i] for b in self._bank)
            q.on_read = self.flush_queues  # a reader of any queue sees every pushed key

    def _queue_bank(self) -> tuple[torch.Tensor, ...]:
        """(keys (Q, K, D), ids (Q, K), ptr (Q,), num_filled (Q,)), re-linked if a copy of the model
        (deepcopy) or a load replaced the queues' buffers."""
        bank_keys = self._bank[0]
        if any(q.keys.data_ptr() != bank_keys[i].data_ptr() or q.ptr.data_ptr() != self._bank[2][i].data_ptr()
               for i, q in enumerate(self._queues())):
            self._link_queues()
        return self._bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys_global: dict, keys_local: dict) -> None:
        """Push this step's keys of all ranks (gathered, rank order) as pending for every queue;
        flush_queues() writes them (the next forward calls it first)."""
        kg = torch.stack([keys_global[lvl] for lvl in self.levels])  # (L, N, 128)
        self._push_keys(kg, torch.stack([keys_local[lvl] for lvl in self.levels]) if self.local else None)

    @torch.no_grad()
    def _push_keys(self, kg: torch.Tensor, kl: torch.Tensor | None) -> None:
        """_dequeue_and_enqueue on stacked keys (L, N, 128), in bank order (Q, N, 128)."""
        keys = torch.stack([kg, kl], dim=1).flatten(0, 1) if kl is not None else kg  # (Q, N, 128)
        gathered = concat_all_gather(keys.transpose(0, 1))  # (world*N, Q, 128): one gather for all
        self._pending.append(gathered.transpose(0, 1))  # (Q, world*N, 128)

    @torch.no_grad()
    def flush_queues(self) -> None:
        """Write the pending keys into the queues (one device-side write for all of them, no host
        sync; a queue given a non-finite key keeps its old contents, see write_keys).

        Called at the start of forward, after the previous step's backward used the queues; a
        trainer that accumulates gradients over several forwards may call it when it chooses
        (a forward after a flush must not share a backward with one before it)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        bank_keys, _, ptr, num_filled = self._queue_bank()
        for keys in pending:
            write_keys(bank_keys, None, ptr, num_filled, keys, None)

    def _write_pending(self) -> None:  # PendingKeysCheckpoint: before state_dict()
        self.flush_queues()

    @torch.no_grad()
    def _batch_shuffle_ddp(self, images: torch.Tensor, patches: torch.Tensor | None):
        """Shuffle the global batch across ranks; each patch set moves with its image.

        images (N, 3, H, W), patches (N, 9, 3, P, P) or None, N per rank. Returns this rank's
        shuffled images and patches and the permutation that undoes the shuffle (None on one
        process, where nothing moves).
        """
        world = comm.get_world_size()
        if world == 1 and self.shuffle_bn and not self._warned_shuffle_bn:
            self._warned_shuffle_bn = True
            logger.warning("MODEL.DETCO.SHUFFLE_BN does nothing in a single process: the key encoder's "
                           "batch norm sees the same batch as without it (official MoCo shuffles only "
                           "under DDP). Train on several ranks, or use GroupNorm / SyncBN and SHUFFLE_BN False.")
        if world == 1 or not self.shuffle_bn:
            return images, patches, None
        n = images.shape[0]
        images_all = concat_all_gather(images)  # (world*N, 3, H, W)
        idx_shuffle = torch.randperm(world * n, device=images.device)  # seeded per step by the trainer
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(world, n)[comm.get_rank()]
        patches_this = concat_all_gather(patches)[idx_this] if patches is not None else None
        return images_all[idx_this], patches_this, idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
        """Undo _batch_shuffle_ddp on per-image rows x (N, ...): row i is again this rank's image i."""
        if idx_unshuffle is None:
            return x
        world = comm.get_world_size()
        x_all = concat_all_gather(x)  # (world*N, ...)
        return x_all[idx_unshuffle.view(world, -1)[comm.get_rank()]]

    # ------------------------------------------------------------------------------------------
    # Embeddings and losses

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float, (x - mean) / std (uint8 - float32 promotes: no separate cast)."""
        return (images - self.pixel_mean) / self.pixel_std

    def _embeddings(self, encoder, heads, inputs: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of every level, stacked: (L, N, 128).

        inputs: views (N, 3, S, S), pooled per level then through the level's head (C -> 128); or
        patch sets (N, 9, 3, P, P), whose 9 pooled patch features are concatenated first (9C -> 128).
        """
        n = inputs.shape[0]
        features = encoder(inputs.flatten(0, 1) if inputs.dim() == 5 else inputs)  # {level: (N or N*9, C, h, w)}
        out = [heads[lvl](features[lvl].mean(dim=(2, 3)).reshape(n, -1)) for lvl in self.levels]  # (N, 128) each
        return F.normalize(out[0][None] if len(out) == 1 else torch.stack(out), dim=2)  # one normalise for all levels

    def _global_embeddings(self, encoder, heads, images: torch.Tensor) -> dict:
        """images (N, 3, H, W) -> {level: L2-normalised (N, 128)}: pool, head, normalise."""
        return dict(zip(self.levels, self._embeddings(encoder, heads, images).unbind(0)))

    def _local_embeddings(self, encoder, heads, patches: torch.Tensor) -> dict:
        """patches (N, 9, 3, P, P) -> {level: L2-normalised (N, 128)} from the 9 pooled patch features."""
        return dict(zip(self.levels, self._embeddings(encoder, heads, patches).unbind(0)))

    def _loss_weights(self, device) -> torch.Tensor:
        """(Q, 2) weight of each (queue, half of its queries) row of contrastive_losses: w_level for a
        term, 0 for the padding rows of a local queue. Rebuilt only when level_weights change."""
        key = tuple(self.level_weights[lvl] for lvl in self.levels)
        if self._term_weights is None or self._term_weights[0] != key:
            rows = [[w, w] for w in key] if not self.local else [r for w in key for r in ([w, w], [w, 0.0])]
            self._term_weights = (key, torch.tensor(rows, dtype=torch.float32, device=device))
        return self._term_weights[1]

    def contrastive_losses(self, q_global: dict, q_local: dict, k_global: dict, k_local: dict) -> dict:
        """{"loss_<level>_gg", "_ll", "_gl": w_level * InfoNCE} against the current queues, from
        {level: (N, 128)} embeddings (see _contrastive_losses)."""
        def stacked(d):
            return torch.stack([d[lvl] for lvl in self.levels]) if d else None
        return self._contrastive_losses(stacked(q_global), stacked(q_local), stacked(k_global), stacked(k_local))

    def _contrastive_losses(self, qg: torch.Tensor, ql: torch.Tensor | None, kg: torch.Tensor,
                            kl: torch.Tensor | None) -> dict:
        """contrastive_losses on stacked embeddings (L, N, 128) (ql, kl None without the local branch).

        All 3·L terms at once: each queue is multiplied by the queries that use it, as one batched
        matmul over the bank. Queue rows: a level's global queue serves [q_global | q_local] with
        positives [k_global | k_global] (g<->g, g<->l); its local queue serves [q_local | 0] with
        [k_local | 0] (l<->l, then weight-0 padding). MoCo v2 (no local branch): each queue serves
        q_global with k_global only.
        """
        bank = self._queue_bank()[0]  # (Q, K, 128)
        n = qg.shape[1]
        if self.local:
            pad = torch.zeros_like(ql)
            queries = torch.stack([torch.cat([qg, ql], 1), torch.cat([ql, pad], 1)], 1).flatten(0, 1)  # (Q, 2N, 128)
            keys = torch.stack([torch.cat([kg, kg], 1), torch.cat([kl, pad], 1)], 1).flatten(0, 1)
            halves = 2
        else:
            queries, keys, halves = qg, kg, 1  # (Q=L, N, 128)
        positive = (queries * keys).sum(dim=2, keepdim=True)  # (Q, rows, 1)
        negatives = torch.bmm(queries, bank.detach().transpose(1, 2))  # (Q, rows, K)
        logits = torch.cat([positive, negatives], dim=2).flatten(0, 1) / self.temperature  # (Q*rows, 1+K)
        labels = _zeros(logits.shape[0], logits.device)  # the positive is at index 0
        if logits.shape[0] == n:  # one term (MoCo v2): the mean is cross_entropy's own reduction
            terms = F.cross_entropy(logits, labels)[None, None]  # (1, 1)
        else:
            terms = F.cross_entropy(logits, labels, reduction="none").view(-1, halves, n).mean(dim=2)  # (Q, halves)
        if self.local or any(w != 1.0 for w in self.level_weights.values()):  # (MoCo v2 at w = 1: no op)
            terms = terms * self._loss_weights(logits.device)[:, :halves]  # w * InfoNCE (0: padding rows)
        values = terms.flatten().unbind()  # one unbind: one op in backward
        if not self.local:
            return {f"loss_{lvl}_gg": value for lvl, value in zip(self.levels, values)}
        # Bank order per level: global queue (gg, gl), local queue (ll, padding).
        return {f"loss_{lvl}_{term}": values[4 * i + j] for i, lvl in enumerate(self.levels)
                for term, j in (("gg", 0), ("ll", 2), ("gl", 1))}

    def forward(self, batched_inputs: list[dict]) -> dict:
        """batched_inputs: N dicts of DetCoViewMapper. Returns the named, weighted losses."""
        if not self.training:
            raise RuntimeError("DetCo is a pretraining model without inference: convert its checkpoint "
                               "with drcl-convert and fine-tune a detector")

        def stack(key):  # uint8 on the model's device; key inputs cross ranks as uint8 (Shuffle BN)
            return torch.stack([x[key] for x in batched_inputs]).to(self.device)

        view_q, view_k = stack("view_q"), stack("view_k")  # (N, 3, S, S) each
        patches_q = patches_k = None
        if self.local:
            patches_q, patches_k = stack("patches_q"), stack("patches_k")  # (N, 9, 3, P, P) each

        # The previous step's keys, now that its backward is done. With gradient accumulation
        # (drcl_d2.engine.accumulate) only before the first micro-batch of a step: all micro-batches
        # of a step see the same queues and key encoder, as one batch of the whole step would.
        first_micro_batch = self.accumulation[0] == 0
        if first_micro_batch:
            self.flush_queues()

        # Queries: (L, N, 128) per branch.
        qg = self._embeddings(self.encoder_q, self.global_heads_q, self._normalize(view_q))
        ql = self._embeddings(self.encoder_q, self.local_heads_q, self._normalize(patches_q)) if self.local else None

        # Keys: momentum update first, then the key encoder on the rank-shuffled batch.
        with torch.no_grad():
            if first_micro_batch:  # once per optimizer step
                self._momentum_update_key_encoder()
            view_k, patches_k, idx_unshuffle = self._batch_shuffle_ddp(view_k, patches_k)
            kg = self._embeddings(self.encoder_k, self.global_heads_k, self._normalize(view_k))
            kl = (self._embeddings(self.encoder_k, self.local_heads_k, self._normalize(patches_k))
                  if self.local else None)  # (L, N, 128) each, in shuffled order

            def unshuffle(k):  # along the batch dimension, all levels in one gather
                return self._batch_unshuffle_ddp(k.transpose(0, 1), idx_unshuffle).transpose(0, 1)
            kg = unshuffle(kg)
            kl = unshuffle(kl) if self.local else None

        # Losses against the queues as they were before this step; this step's keys are pushed
        # and enter the queues at the start of the next forward (flush_queues).
        losses = self._contrastive_losses(qg, ql, kg, kl)
        self._push_keys(kg, kl)
        return losses
