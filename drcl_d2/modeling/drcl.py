"""2DRCL: Dynamic Rebalancing Contrastive Learning with Dual Reconstruction (NeurIPS 2024).

The whole detector is pretrained: the online network is a detectron2 ResNet-FPN backbone, RPN
and the standard RoI box pooler + box head, under GeneralizedRCNN's module names, so every
pretrained module converts into a Faster / Mask R-CNN (drcl-convert). A target network, an
exponential moving average of the online one, gives the keys. Per image: two views and a shared
box set (drcl_d2.data.drcl_views). Losses (SPEC §2):

    HCL  holistic InfoNCE on global embeddings, target keys of the other view, queue negatives
    LCL  the same on box embeddings (RoIAlign -> box head), other boxes + box queue as negatives
    AR   ||x - g(f(x))||², decoder g from the FPN to the normalised image at stride 4
    SR   Σ_p ||f(x) - f(M(g(f(x))))||² on maps standardised per channel over space (SR_NORM),
         target maps of x as f(x)
    RPN  the boxes as class-agnostic ground truth

Designed-out failure modes (SPEC §7), each with a health signal logged under `health/`:
- the decoder has a norm before its ReLU (dead decoder): decoder_active, recon_corr;
- SR compares maps standardised per channel over space, so a per-channel offset or a rescale
  cannot lower it (SR shortcut): sr_centered, fpn_<level>_std / _mean_spread;
- queue keys carry their image id and a query never meets its own image among the negatives
  (self-negatives under DRB): hcl_self_negatives, lcl_self_negatives; fc7_norm.

Dynamic Rebalancing is the data sampler (DATALOADER.SAMPLER_TRAIN), not part of this module.

Launch cost (SPEC §7): the EMA update is three fused ops (MomentumUpdate); the unpadded region of
every image at every stride is one set of masks (ValidRegions, one rounding rule), so HCL pooling,
AR and SR are masked sums over the padded batch instead of per-image loops; SR's five levels are
standardised and compared as one flattened map; the RPN computes its losses only (its proposals
are not used) on cached anchors; RoI pooling assigns levels without host syncs. A step's keys
enter the queues at the start of the next forward (flush_queues), so no loss needs a copy of them.
"""
from __future__ import annotations

import copy
import functools
import zlib

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_proposal_generator
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .heads import MLPHead, ReconstructionDecoder
from .losses import info_nce, info_nce_with_batch_negatives, same_image_mask
from .momentum import (DetectorModules, FeatureQueue, MicroBatchAware, MomentumUpdate, concat_all_gather, copy_params,
                       cosine_momentum, gather_variable)
from ..utils import ceil_div, unpadded_size

__all__ = ["DRCL", "BoxFeatureHead"]


class BoxFeatureHead(nn.Module):
    """The RoI box pooler and box head of StandardROIHeads, without the class-specific predictor.

    Held as `roi_heads` so the box head's weights are named `roi_heads.box_head.*`, as in a
    detectron2 Faster / Mask R-CNN.
    """

    def __init__(self, in_features: list[str], box_pooler, box_head):
        super().__init__()
        self.in_features = in_features
        self.box_pooler = box_pooler
        self.box_head = box_head

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor], rois=None) -> torch.Tensor:
        """features: FPN maps; boxes: per image (n_i, 4) XYXY -> (Σn_i, box_head dim).
        rois: box_rois(boxes), shared by the calls on the same boxes (online and target)."""
        rois, levels = rois if rois is not None else self.box_rois(boxes)
        return self.box_head(self._pool([features[f] for f in self.in_features], rois, levels))

    def box_rois(self, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rois (M, 5): image index, x0, y0, x1, y1; FPN level index of each box (M,), None for one
        level): ROIPooler's inputs, built without a host sync (the box counts are host data)."""
        pooler = self.box_pooler
        image_index = torch.tensor([i for i, b in enumerate(boxes) for _ in range(len(b))],
                                   dtype=boxes[0].dtype, device=boxes[0].device)  # (M,)
        rois = torch.cat([image_index[:, None], torch.cat(boxes)], dim=1)
        if len(pooler.level_poolers) == 1:
            return rois, None
        levels = assign_boxes_to_levels([Boxes(b) for b in boxes], pooler.min_level, pooler.max_level,
                                        pooler.canonical_box_size, pooler.canonical_level)
        return rois, levels

    def _pool(self, features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        """ROIPooler.forward without its per-level nonzero (one host sync per level): every level
        pools every box and each box keeps its own level's result. The same values and gradients,
        for a few boxes' extra RoIAlign work. -> (M, C, R, R)"""
        poolers = self.box_pooler.level_poolers
        if levels is None:
            return poolers[0](features[0], rois)
        out = poolers[0](features[0], rois)
        for level in range(1, len(poolers)):
            out = torch.where((levels == level)[:, None, None, None], poolers[level](features[level], rois), out)
        return out


class TargetNetwork(nn.Module):
    """The EMA copy: backbone+FPN, box head and both projectors (no predictors, as in BYOL)."""

    def __init__(self, backbone, roi_heads, hcl_projector, lcl_projector):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.roi_heads = copy.deepcopy(roi_heads)
        self.hcl_projector = copy.deepcopy(hcl_projector)
        self.lcl_projector = copy.deepcopy(lcl_projector)
        for p in self.parameters():
            p.requires_grad_(False)


class ValidRegions:
    """The unpadded region of each image of a padded batch at several strides, as 0/1 masks.

    One rule for every use (HCL pooling, AR, SR): at stride s, an image of h × w pixels covers the
    top-left ceil(h / s) × ceil(w / s) cells of a feature map (at least 1 × 1), i.e. every cell
    that holds a real pixel. The masks of all strides are built together on the device, laid out
    as one flattened map: positions (N, P) with P = Σ_s H_s·W_s, the strides in the given order.
    """

    def __init__(self, image_sizes, shapes: dict[int, tuple[int, int]], device):
        """image_sizes: N (h, w) unpadded sizes; shapes: {stride: (H_s, W_s)} padded map sizes."""
        self.strides = list(shapes)
        self.shapes = shapes
        layout = _region_layout(tuple(shapes.items()), torch.device(device))  # position -> (row, col, stride)
        self.offsets = dict(zip(self.strides, layout["offsets"]))
        self.level = layout["level"]  # (P,) stride index of each position
        sizes = torch.tensor(image_sizes, dtype=torch.long, device=device)  # (N, 2): one host-to-device copy
        cells = ceil_div(sizes[:, :, None], layout["strides"]).clamp_(min=1)  # (N, 2, S): utils.unpadded_size
        self.counts = (cells[:, 0] * cells[:, 1]).to(torch.float32)  # (N, S) cells per image and stride
        inside = (layout["row"] < cells[:, 0][:, self.level]) & (layout["col"] < cells[:, 1][:, self.level])
        self.flat = inside.to(torch.float32)  # (N, P)

    def mask(self, stride: int) -> torch.Tensor:
        """(N, 1, H_s, W_s) 1 on each image's unpadded cells at `stride`."""
        h, w = self.shapes[stride]
        start = self.offsets[stride]
        return self.flat[:, start:start + h * w].unflatten(1, (1, h, w))

    def count(self, stride: int) -> torch.Tensor:
        """(N,) unpadded cells of each image at `stride`."""
        return self.counts[:, self.strides.index(stride)]

    def masked_mean(self, feature: torch.Tensor, stride: int) -> torch.Tensor:
        """Global average pool of each image's unpadded region: feature (N, C, H, W) -> (N, C)."""
        return (feature * self.mask(stride)).sum(dim=(2, 3)) / self.count(stride)[:, None]


@functools.lru_cache(maxsize=16)
def _region_layout(shapes: tuple, device: torch.device) -> dict:
    """Row, column and stride index of every position of the flattened maps of `shapes`
    ((stride, (H, W)), ...). Depends on the padded shapes only: built on the host once per shapes
    (a few recent ones kept: about 1 MB each at 800×1216) and copied to the device."""
    rows, cols, level, offsets, start = [], [], [], [], 0
    for i, (_, (h, w)) in enumerate(shapes):
        grid_r, grid_c = torch.meshgrid(torch.arange(h, dtype=torch.int32), torch.arange(w, dtype=torch.int32),
                                        indexing="ij")
        rows.append(grid_r.flatten())
        cols.append(grid_c.flatten())
        level.append(torch.full((h * w,), i, dtype=torch.long))
        offsets.append(start)
        start += h * w
    return {"row": torch.cat(rows).to(device), "col": torch.cat(cols).to(device),
            "level": torch.cat(level).to(device), "offsets": offsets,
            "strides": torch.tensor([s for s, _ in shapes], device=device)}


def _valid_mean(feature: torch.Tensor, image_sizes, stride: int) -> torch.Tensor:
    """Global average pool of each image's unpadded region (ValidRegions' rule). (N, C, H, W) -> (N, C)."""
    regions = ValidRegions(image_sizes, {stride: tuple(feature.shape[-2:])}, feature.device)
    return regions.masked_mean(feature, stride)


def _segment_sum(x: torch.Tensor, level: torch.Tensor, num_levels: int) -> torch.Tensor:
    """x (..., P) summed over the positions of each level: (..., num_levels)."""
    return x.new_zeros(x.shape[:-1] + (num_levels,)).index_add_(x.dim() - 1, level, x)


def _masked_standardize(x: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, level: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """Each channel of each image and level standardised over its unpadded positions, 0 elsewhere.

    x (N, C, P) flattened maps, mask (N, 1, P), counts (N, 1, L) positions per level, level (P,).
    Per (image, channel, level) as F.instance_norm over that map's unpadded region: (x - mean) /
    sqrt(biased var + eps).
    """
    num_levels = counts.shape[-1]
    mean = _segment_sum(x * mask, level, num_levels) / counts  # (N, C, L)
    centered = (x - mean[..., level]) * mask
    var = _segment_sum(centered.pow(2), level, num_levels) / counts
    return centered * torch.rsqrt(var + eps)[..., level]


def _image_id_tensor(batched_inputs, device) -> torch.Tensor:
    """The dataset's image ids (N,) int64: rank-independent, so a key keeps its identity in the
    gathered queue. Non-integer ids (file names) are hashed; a missing id is -1 (never excluded)."""
    ids = []
    for x in batched_inputs:
        image_id = x.get("image_id", -1)
        try:
            ids.append(int(image_id))
        except (TypeError, ValueError):
            ids.append(zlib.crc32(str(image_id).encode()))
    return torch.tensor(ids, dtype=torch.long, device=device)


def _batch_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of a and b (N, ...) per sample, averaged over the batch (a scalar)."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()


@META_ARCH_REGISTRY.register()
class DRCL(MicroBatchAware, nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone,
        proposal_generator,
        roi_heads: BoxFeatureHead,
        decoder: ReconstructionDecoder,
        pixel_mean,
        pixel_std,
        hcl_in_feature: str = "p5",
        embed_dim: int = 256,
        hidden_dim: int = 256,
        temperature: float = 0.2,
        hcl_queue_size: int = 16384,
        lcl_queue_size: int = 65536,
        loss_weights: dict[str, float],
        base_momentum: float = 0.996,
        max_iter: int = 90000,
        sr_in_features: list[str] = ("p2", "p3", "p4", "p5", "p6"),
        sr_patch_size: int = 32,
        sr_mask_ratio: float = 0.5,
        sr_norm: str = "spatial",
        exclude_same_image: bool = True,
        health_period: int = 20,
        depth: int = 50,
    ):
        """
        Args:
            backbone, proposal_generator: detectron2's ResNet-FPN and RPN (online network).
            roi_heads: the RoI box pooler + box head (online network).
            decoder: g of the appearance reconstruction.
            hcl_in_feature: FPN level pooled into the holistic embedding.
            embed_dim, hidden_dim: projection / prediction MLP sizes (paper: 256, 256).
            temperature: τ of both InfoNCE terms.
            hcl_queue_size, lcl_queue_size: K of the image and box queues.
            loss_weights: {"hcl", "lcl", "ar", "sr", "rpn"} -> λ; 0 switches a term off.
            base_momentum, max_iter: EMA momentum, rising from base to 1 on a cosine over max_iter.
            sr_in_features, sr_patch_size, sr_mask_ratio: semantic reconstruction's levels and mask M.
            sr_norm: how SR's compared maps are normalised: "spatial" (each channel standardised
                over space; immune to per-channel offsets and rescaling) or "channel" (L2 over
                channels per position, the earlier form, which an FPN offset can satisfy).
            exclude_same_image: leave queue keys (and other batch entries) of the query's own image
                out of the negatives of HCL and LCL.
            health_period: iterations between health measurements (0: never).
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.decoder = decoder
        shapes = backbone.output_shape()
        box_dim = roi_heads.box_head.output_shape.channels
        self.hcl_projector = MLPHead(shapes[hcl_in_feature].channels, hidden_dim, embed_dim)
        self.hcl_predictor = MLPHead(embed_dim, hidden_dim, embed_dim)
        self.lcl_projector = MLPHead(box_dim, hidden_dim, embed_dim)
        self.lcl_predictor = MLPHead(embed_dim, hidden_dim, embed_dim)
        self.target = TargetNetwork(backbone, roi_heads, self.hcl_projector, self.lcl_projector)
        # Initial keys seeded by queue index (FeatureQueue): the same on every rank.
        self.queue_hcl = FeatureQueue(hcl_queue_size, embed_dim, seed_index=0)  # (K_h, D) image keys
        self.queue_lcl = FeatureQueue(lcl_queue_size, embed_dim, seed_index=1)  # (K_l, D) box keys
        self._momentum_update = MomentumUpdate(self._online_target_pairs)
        self._anchors = {}  # RPN anchors per feature map sizes (_rpn_losses)

        self.hcl_in_feature = hcl_in_feature
        self.hcl_stride = shapes[hcl_in_feature].stride
        self.temperature = temperature
        unknown = set(loss_weights) - {"hcl", "lcl", "ar", "sr", "rpn"}
        if unknown:
            raise ValueError(f"Unknown 2DRCL loss terms {sorted(unknown)}")
        self.loss_weights = dict(loss_weights)
        self.base_momentum = base_momentum
        self.max_iter = max_iter
        self.sr_in_features = list(sr_in_features)
        self.strides = {f: shape.stride for f, shape in shapes.items()}  # backbone outputs
        self.sr_patch_size = sr_patch_size
        self.sr_mask_ratio = sr_mask_ratio
        if sr_norm not in ("spatial", "channel"):
            raise ValueError(f"MODEL.DRCL.SR_NORM must be 'spatial' or 'channel', got {sr_norm!r}")
        self.sr_norm = sr_norm
        self.exclude_same_image = exclude_same_image
        self.health_period = health_period
        self.depth = depth
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        # detectron2's own RoI box pooler + box head (the class-specific predictor is not used).
        box = StandardROIHeads._init_box_head(cfg, shapes)
        d = cfg.MODEL.DRCL
        # Every FPN level but the max-pooled p6, which carries nothing p5 does not.
        decoder_in = [f for f in shapes if f != "p6"]
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, shapes),
            "roi_heads": BoxFeatureHead(box["box_in_features"], box["box_pooler"], box["box_head"]),
            "decoder": ReconstructionDecoder(shapes, decoder_in, d.DECODER_DIM, d.DECODER_STRIDE, d.DECODER_NORM),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "hcl_in_feature": d.HCL_IN_FEATURE,
            "embed_dim": d.EMBED_DIM,
            "hidden_dim": d.MLP_HIDDEN_DIM,
            "temperature": d.TEMPERATURE,
            "hcl_queue_size": d.HCL_QUEUE_SIZE,
            "lcl_queue_size": d.LCL_QUEUE_SIZE,
            "loss_weights": {"hcl": d.HCL_WEIGHT, "lcl": d.LCL_WEIGHT, "ar": d.AR_WEIGHT,
                             "sr": d.SR_WEIGHT, "rpn": d.RPN_WEIGHT},
            "base_momentum": d.MOMENTUM,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "sr_in_features": d.SR_IN_FEATURES,
            "sr_patch_size": d.SR_PATCH_SIZE,
            "sr_mask_ratio": d.SR_MASK_RATIO,
            "sr_norm": d.SR_NORM,
            "exclude_same_image": d.EXCLUDE_SAME_IMAGE,
            "health_period": d.HEALTH_PERIOD if d.HEALTH_PERIOD >= 0 else cfg.PRETRAIN.LOG_PERIOD,
            "depth": cfg.MODEL.RESNETS.DEPTH,
        }

    @classmethod
    def build_mapper(cls, cfg, dataset_dicts):
        """The two-view box mapper, and the pretraining list (images without proposals dropped)."""
        from ..data.drcl_views import build_two_view_mapper

        return build_two_view_mapper(cfg, dataset_dicts)

    @property
    def has_unused_parameters(self) -> bool:
        """True when a switched-off term leaves its modules without gradients (DDP must know)."""
        return any(v == 0 for v in self.loss_weights.values())

    @property
    def device(self):
        return self.pixel_mean.device

    # ---- target network -------------------------------------------------------------------
    def online_network(self) -> nn.Module:
        return DetectorModules(backbone=self.backbone, proposal_generator=self.proposal_generator,
                               roi_heads=self.roi_heads)

    def _online_target_pairs(self):
        t = self.target
        return [(self.backbone, t.backbone), (self.roi_heads, t.roi_heads),
                (self.hcl_projector, t.hcl_projector), (self.lcl_projector, t.lcl_projector)]

    @torch.no_grad()
    def init_target(self):
        """Target <- online (called at iteration 0, after MODEL.WEIGHTS is loaded)."""
        for online, target in self._online_target_pairs():
            copy_params(online, target)

    @torch.no_grad()
    def update_target(self, iteration: int):
        """EMA step after the optimizer step of `iteration`: m rises from base to 1 (cosine)."""
        self._momentum_update(cosine_momentum(self.base_momentum, iteration + 1, self.max_iter))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._momentum_update.reset()  # .to() / .cuda() replace buffers: list the tensors again
        self._anchors = {}
        return self

    @torch.no_grad()
    def flush_queues(self) -> None:
        """Write the keys pushed by the previous step into the queues (FeatureQueue.flush: on the
        device, no host sync, non-finite keys never stored). forward calls it first; a trainer that
        accumulates gradients over several forwards may call it when it chooses."""
        self.queue_hcl.flush()
        self.queue_lcl.flush()

    def compile_step(self, mode: str = "default") -> None:
        """torch.compile the backbones and the decoder in place (PRETRAIN.COMPILE): names,
        state_dict and parameters unchanged; box, RPN and loss code stay eager (variable box counts)."""
        for module in (self.backbone, self.target.backbone, self.decoder):
            module.compile(mode=mode, dynamic=True)

    def checkpoint_meta(self) -> dict:
        return {"method": "drcl", "depth": self.depth}

    # ---- the algorithm --------------------------------------------------------------------
    def _images(self, batched_inputs, key: str) -> ImageList:
        images = [(x[key].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def _health_due(self) -> bool:
        """True on the iterations whose metrics the PeriodicWriter writes ((iter + 1) % period == 0)."""
        if self.health_period <= 0:
            return False
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # outside a trainer (unit tests)
            return False
        return (iteration + 1) % self.health_period == 0 or iteration + 1 == self.max_iter

    def _valid_regions(self, images: ImageList, features: dict, names, extra_strides=()) -> ValidRegions:
        """ValidRegions of `images` at the strides of the feature maps `names` (in that order, so
        their flattened layout is their concatenation) and at `extra_strides` (padded size / s)."""
        shapes = {self.strides[f]: tuple(features[f].shape[-2:]) for f in names}
        h, w = images.tensor.shape[-2:]
        for s in extra_strides:
            shapes.setdefault(s, (h // s, w // s))  # avg_pool2d's map of the padded batch, not unpadded_size
        return ValidRegions(images.image_sizes, shapes, self.device)

    def forward(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        if not self.training:
            raise RuntimeError("DRCL is a pretraining model; convert it (drcl-convert) to run a detector")
        # The previous step's keys, now that its backward is done; with gradient accumulation only
        # before a step's first micro-batch (all micro-batches see the same queues; the target
        # moves once per optimizer step, TargetNetworkHook).
        if self.accumulation[0] == 0:
            self.flush_queues()
        w = self.loss_weights
        health = {} if self._health_due() else None  # name -> 0-d tensor, logged under health/
        images_1 = self._images(batched_inputs, "image_v1")  # (N, 3, H, W), normalised, padded
        images_2 = self._images(batched_inputs, "image_v2")
        boxes_1 = [x["boxes_v1"].to(self.device) for x in batched_inputs]  # per image (n_i, 4) XYXY
        boxes_2 = [x["boxes_v2"].to(self.device) for x in batched_inputs]
        image_ids = _image_id_tensor(batched_inputs, self.device)  # (N,)

        feats_1 = self.backbone(images_1.tensor)  # {p2..p6: (N, 256, H/s, W/s)}
        feats_2 = self.backbone(images_2.tensor)
        with torch.no_grad():
            target_1 = self.target.backbone(images_1.tensor)
            target_2 = self.target.backbone(images_2.tensor)
        # Unpadded regions: view 1 at the SR levels (first: SR flattens them in this order), HCL's
        # level and the decoder's stride; view 2 at HCL's level.
        regions_1 = self._valid_regions(images_1, feats_1, [*self.sr_in_features, self.hcl_in_feature],
                                        [self.decoder.out_stride])
        regions_2 = self._valid_regions(images_2, feats_2, [self.hcl_in_feature])

        losses, new_keys = {}, {}
        if w["hcl"] > 0:
            loss, new_keys["hcl"] = self._holistic_loss(regions_1, regions_2, feats_1, feats_2, target_1, target_2,
                                                        image_ids, health)
            losses["loss_hcl"] = w["hcl"] * loss
        if w["lcl"] > 0:
            loss, new_keys["lcl"] = self._local_loss(feats_1, feats_2, target_1, target_2, boxes_1, boxes_2,
                                                     image_ids, health)
            losses["loss_lcl"] = w["lcl"] * loss
        if w["rpn"] > 0:
            losses.update({k: v * w["rpn"] for k, v in self._rpn_losses(images_1, feats_1, boxes_1).items()})
        if w["ar"] > 0 or w["sr"] > 0:
            recon, hidden = self.decoder(feats_1, return_hidden=True)  # (N, 3, H/4, W/4) normalised pixels
            if w["ar"] > 0:
                losses["loss_ar"] = w["ar"] * self._appearance_loss(recon, images_1, regions_1)
            if w["sr"] > 0:
                losses["loss_sr"] = w["sr"] * self._semantic_loss(recon, images_1, target_1, batched_inputs, health,
                                                                  regions_1)
            if health is not None:
                self._decoder_health(recon, hidden, images_1, health)
        if health is not None:
            self._put_health(feats_1, boxes_1, health)

        # This step's keys and image ids of all ranks (gathered above) enter the queues at the start
        # of the next forward (flush_queues): the losses above still hold the queues for backward.
        if "hcl" in new_keys:
            self.queue_hcl.push(*new_keys["hcl"])
        if "lcl" in new_keys:
            self.queue_lcl.push(*new_keys["lcl"])
        return losses

    def _rpn_losses(self, images: ImageList, features: dict, boxes: list[torch.Tensor]) -> dict:
        """detectron2's RPN losses with the boxes as class-agnostic ground truth.

        RPN.forward without its predict_proposals (top-k, NMS, filtering per image): 2DRCL never
        uses the proposals, and that part launches many ops and syncs with the host.
        """
        rpn = self.proposal_generator
        gt = [Instances(size, gt_boxes=Boxes(b)) for size, b in zip(images.image_sizes, boxes)]
        if not isinstance(rpn, RPN):  # another proposal generator: its own forward
            return rpn(images, features, gt)[1]
        maps = [features[f] for f in rpn.in_features]
        sizes = tuple(tuple(x.shape[-2:]) for x in maps)
        anchors = self._anchors.get(sizes)
        if anchors is None:  # a function of the map sizes only: built once per padded size
            anchors = self._anchors[sizes] = rpn.anchor_generator(maps)
            while len(self._anchors) > 16:
                self._anchors.pop(next(iter(self._anchors)))
        logits, deltas = rpn.rpn_head(maps)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]  # (N, A, Hi, Wi) -> (N, Hi*Wi*A)
        box_dim = rpn.anchor_generator.box_dim  # (N, A*B, Hi, Wi) -> (N, Hi*Wi*A, B)
        deltas = [x.view(x.shape[0], -1, box_dim, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt)
        return rpn.losses(anchors, logits, gt_labels, deltas, gt_boxes)

    def _holistic_loss(self, regions_1, regions_2, feats_1, feats_2, target_1, target_2, image_ids, health):
        """HCL, symmetric over the views. Returns (loss, (keys (2·N_global, D), their image ids))."""
        f, s = self.hcl_in_feature, self.hcl_stride
        n = image_ids.shape[0]
        # Both views go through the MLPs as one batch of 2N: their BatchNorm then always sees >= 2
        # samples (one image per GPU works) and both views are normalised alike.
        pooled = torch.cat([regions_1.masked_mean(feats_1[f], s), regions_2.masked_mean(feats_2[f], s)])  # (2N, C)
        z1, z2 = F.normalize(self.hcl_predictor(self.hcl_projector(pooled)), dim=1).split(n)  # (N, D) each
        with torch.no_grad():
            pooled_t = torch.cat([regions_1.masked_mean(target_1[f], s), regions_2.masked_mean(target_2[f], s)])
            k1, k2 = F.normalize(self.target.hcl_projector(pooled_t), dim=1).split(n)
            all_ids = concat_all_gather(image_ids)  # (N_global,)
        queue = self.queue_hcl.keys  # (K, D): written only at the next forward, no copy needed
        own = same_image_mask(image_ids, self.queue_hcl.ids)  # (N, K): stale keys of the same image
        if health is not None:
            health["hcl_self_negatives"] = own.any(dim=1).float().mean()
        exclude = own if self.exclude_same_image else None
        loss = 0.5 * (info_nce(z1, k2, queue, self.temperature, exclude)
                      + info_nce(z2, k1, queue, self.temperature, exclude))
        # View-1 keys of all ranks, then view-2 keys: the queue order of a single-process run.
        return loss, (torch.cat([concat_all_gather(k1), concat_all_gather(k2)]), torch.cat([all_ids, all_ids]))

    def _local_loss(self, feats_1, feats_2, target_1, target_2, boxes_1, boxes_2, image_ids, health):
        """LCL on boxes: box i of view 1 against box i of view 2 (target), symmetric.

        Negatives: the other boxes of the global batch (gathered from all ranks) and the box queue,
        except keys of the query's own image that are not its own view pair: stale queue keys of
        the image, and the boxes of another copy of the image in this batch (DRB repeats images).
        The other boxes of the same view pair stay negatives: they are other objects.
        Returns (loss, (keys of the whole batch to enqueue (2·M_global, D), their image ids)).
        """
        counts = [len(b) for b in boxes_1]
        m = sum(counts)
        # Both views' boxes through the MLPs as one batch of 2M (see _holistic_loss).
        rois_1, rois_2 = self.roi_heads.box_rois(boxes_1), self.roi_heads.box_rois(boxes_2)  # online and target
        box_feats = torch.cat([self.roi_heads(feats_1, boxes_1, rois_1),
                               self.roi_heads(feats_2, boxes_2, rois_2)])  # (2M, C)
        if health is not None:
            health["fc7_norm"] = box_feats.detach().norm(dim=1).mean() if m else box_feats.new_zeros(())
        q1, q2 = F.normalize(self.lcl_predictor(self.lcl_projector(box_feats)), dim=1).split(m)  # (M, D) each
        with torch.no_grad():
            t = self.target
            box_feats_t = torch.cat([t.roi_heads(target_1, boxes_1, rois_1), t.roi_heads(target_2, boxes_2, rois_2)])
            k1, k2 = F.normalize(t.lcl_projector(box_feats_t), dim=1).split(m)  # (M, D) each
            (all_k1, sizes), (all_k2, _) = gather_variable(k1), gather_variable(k2)  # (M_global, D)
            offset = sum(sizes[: comm.get_rank()])  # this rank's first box in the gathered list
            # Per box: its image id and its batch entry (global index of the view pair). The box
            # counts are host data: one host-to-device copy, no data-dependent op.
            per_box = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.long,
                                   device=self.device)  # (M,)
            entry = per_box + comm.get_rank() * len(counts)
            box_ids = image_ids[per_box]
            all_ids, _ = gather_variable(torch.stack([box_ids, entry], dim=1))  # (M_global, 2)
        queue = self.queue_lcl.keys  # (K, D): written only at the next forward, no copy needed
        own_queue = same_image_mask(box_ids, self.queue_lcl.ids)  # (M, K)
        own_batch = same_image_mask(box_ids, all_ids[:, 0]) & (entry[:, None] != all_ids[None, :, 1])  # (M, M_all)
        if health is not None:
            health["lcl_self_negatives"] = (own_queue.any(1) | own_batch.any(1)).float().mean() if m \
                else box_feats.new_zeros(())
        if not self.exclude_same_image:
            own_queue = own_batch = None
        positives = torch.arange(q1.shape[0], device=q1.device) + offset
        loss = 0.5 * (info_nce_with_batch_negatives(q1, all_k2, positives, queue, self.temperature, own_batch, own_queue)
                      + info_nce_with_batch_negatives(q2, all_k1, positives, queue, self.temperature, own_batch, own_queue))
        # Ranks hold different numbers of boxes; DDP averages gradients over ranks. Scaling the
        # local mean by M_local·W / M_global makes that average the mean over every box of the
        # global batch, as a single process would compute it.
        loss = loss * (q1.shape[0] * comm.get_world_size() / max(all_k1.shape[0], 1))
        return loss, (torch.cat([all_k1, all_k2]), torch.cat([all_ids[:, 0], all_ids[:, 0]]))

    def _appearance_loss(self, recon, images, regions: ValidRegions | None = None):
        """L_AR: mean squared error to the normalised input average-pooled to the decoder's stride,
        over each image's unpadded region (ValidRegions), averaged over images."""
        stride = self.decoder.out_stride
        target = F.avg_pool2d(images.tensor, stride)  # (N, 3, H/4, W/4)
        if regions is None:
            regions = self._valid_regions(images, {}, [], [stride])
        squared = (recon - target).pow(2) * regions.mask(stride)  # (N, 3, H/4, W/4), 0 on padding
        per_image = squared.sum(dim=(1, 2, 3)) / (recon.shape[1] * regions.count(stride))  # (N,)
        return per_image.mean()

    def _semantic_mask(self, batched_inputs, shape) -> torch.Tensor:
        """M: 1 for kept pixels, 0 on random patches (ratio sr_mask_ratio). (N, 1, H, W)

        Drawn per image from (image id, iteration), so the same image at the same iteration is
        masked alike on any number of ranks and after a resume. The draw runs on the host; the
        grids of all images reach the device in one copy.
        """
        n, _, h, w = shape
        p = self.sr_patch_size
        gh, gw = unpadded_size(h, w, p)
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # outside a trainer (unit tests)
            iteration = 0
        num_masked = int(round(self.sr_mask_ratio * gh * gw))
        grid = torch.ones(n, gh * gw)  # host
        for i, x in enumerate(batched_inputs):
            g = torch.Generator().manual_seed((int(x.get("image_id", 0)) * 7919 + iteration) % (2**63 - 1))
            grid[i, torch.randperm(gh * gw, generator=g)[:num_masked]] = 0.0
        mask = grid.view(n, 1, gh, gw).to(self.device)
        return F.interpolate(mask, scale_factor=p, mode="nearest")[:, :, :h, :w]

    def _semantic_loss(self, recon, images, target_1, batched_inputs, health=None,
                       regions: ValidRegions | None = None):
        """L_SR = Σ_p ||f(x) - f(M(g(f(x))))||² with f(x) from the target (stop-gradient), each
        map normalised as SR_NORM says before the squared distance (see spatially_normalized_mse),
        over each image's unpadded region (ValidRegions), summed over levels, averaged over images.

        All levels at once: the maps are flattened and concatenated, (N, C, P) with P = Σ H_p·W_p,
        and per-level sums are segment sums over the positions of each level.
        """
        full = F.interpolate(recon, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        masked = full * self._semantic_mask(batched_inputs, full.shape)  # masked patches -> mean pixel (0)
        feats = self.backbone(masked)  # gradients reach g and f
        if regions is None:
            regions = self._valid_regions(images, feats, self.sr_in_features)
        online = torch.cat([feats[f].flatten(2) for f in self.sr_in_features], dim=2)  # (N, C, P)
        target = torch.cat([target_1[f].flatten(2) for f in self.sr_in_features], dim=2).detach()
        num_levels, positions = len(self.sr_in_features), online.shape[2]
        mask, level = regions.flat[:, None, :positions], regions.level[:positions]  # (N, 1, P), (P,)
        counts = regions.counts[:, :num_levels]  # (N, L) unpadded positions per level
        if self.sr_norm == "spatial":  # spatially_normalized_mse per image and level
            diff = (_masked_standardize(online, mask, counts[:, None], level, 1e-5)
                    - _masked_standardize(target, mask, counts[:, None], level, 1e-5))
            per_level = _segment_sum(diff.pow(2).sum(dim=1), level, num_levels) / (counts * online.shape[1])
        else:  # l2_normalized_mse per image and level
            per_level = _segment_sum(self._channel_l2_distance(online, target, mask), level, num_levels) / counts
        if health is not None:  # the channel-L2 form with each map's per-channel offset removed
            with torch.no_grad():
                def centered(x):
                    mean = _segment_sum(x * mask, level, num_levels) / counts[:, None]  # (N, C, L)
                    return x - mean[..., level]
                distance = self._channel_l2_distance(centered(online), centered(target), mask)
                health["sr_centered"] = (_segment_sum(distance, level, num_levels) / counts).sum(dim=1).mean()
        return per_level.sum(dim=1).mean()  # (N, L) -> Σ levels, mean over images

    @staticmethod
    def _channel_l2_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """||n(a) - n(b)||² per position, n = L2 normalisation over channels; a, b (N, C, P) -> (N, P),
        0 on padding (mask (N, 1, P))."""
        return (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(dim=1) * mask[:, 0]

    # ---- health signals (SPEC §7): what a falling loss cannot show ----------------------------
    @torch.no_grad()
    def _decoder_health(self, recon, hidden, images, health):
        """Share of live ReLUs in the decoder, correlation of g(f(x)) with the input at its stride,
        and the reconstruction's spatial std (0 for a constant image)."""
        stride = self.decoder.out_stride
        target = F.avg_pool2d(images.tensor, stride)
        h, w = (min(hw) for hw in zip(*images.image_sizes))
        # The region every image fills: floor, not unpadded_size's ceil (a partly padded cell's
        # pooled target mixes in padding).
        h, w = max(1, h // stride), max(1, w // stride)
        health["decoder_active"] = (hidden > 0).float().mean()
        health["recon_corr"] = _batch_correlation(recon[:, :, :h, :w], target[:, :, :h, :w])
        health["recon_spatial_std"] = recon[:, :, :h, :w].flatten(2).std(dim=2).mean()

    @torch.no_grad()
    def _put_health(self, feats, boxes, health):
        """FPN output scale per level (std, and the spread of per-channel means: an offset shows
        there), then everything measured this step into the event storage under health/."""
        for level, x in feats.items():
            health[f"fpn_{level}_std"] = x.std()
            health[f"fpn_{level}_mean_spread"] = x.mean(dim=(0, 2, 3)).std()
        get_event_storage().put_scalars(**{f"health/{k}": float(v) for k, v in health.items()},
                                        smoothing_hint=False)
