"""2DRCL: Dynamic Rebalancing Contrastive Learning with Dual Reconstruction (NeurIPS 2024).

The whole detector is pretrained: the online network is a detectron2 ResNet-FPN backbone, RPN
and the standard RoI box pooler + box head, under GeneralizedRCNN's module names, so every
pretrained module converts into a Faster / Mask R-CNN (drcl-convert). A target network, an
exponential moving average of the online one, gives the keys. Per image: two views and a shared
box set (drcl_d2.data.two_view). Losses (SPEC §2):

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
"""
from __future__ import annotations

import copy
import zlib

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_proposal_generator
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .heads import MLPHead, ReconstructionDecoder
from .losses import (info_nce, info_nce_with_batch_negatives, l2_normalized_mse, same_image_mask,
                     spatially_normalized_mse)
from .momentum import FeatureQueue, concat_all_gather, copy_params, cosine_momentum, gather_variable, momentum_update

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

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """features: FPN maps; boxes: per image (n_i, 4) XYXY -> (Σn_i, box_head dim)."""
        pooled = self.box_pooler([features[f] for f in self.in_features], [Boxes(b) for b in boxes])
        return self.box_head(pooled)


class OnlineDetectorView(nn.Module):
    """The online modules under GeneralizedRCNN's names, for loading MODEL.WEIGHTS into them."""

    def __init__(self, model: "DRCL"):
        super().__init__()
        self.backbone = model.backbone
        self.proposal_generator = model.proposal_generator
        self.roi_heads = model.roi_heads


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


def _valid_mean(feature: torch.Tensor, image_sizes, stride: int) -> torch.Tensor:
    """Global average pool of each image's unpadded region. feature (N, C, H, W) -> (N, C)."""
    pooled = []
    for i, (h, w) in enumerate(image_sizes):
        hs, ws = max(1, -(-h // stride)), max(1, -(-w // stride))
        pooled.append(feature[i, :, :hs, :ws].mean(dim=(1, 2)))
    return torch.stack(pooled)


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
class DRCL(nn.Module):
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
        self.queue_hcl = FeatureQueue(hcl_queue_size, embed_dim)  # (K_h, D) image keys
        self.queue_lcl = FeatureQueue(lcl_queue_size, embed_dim)  # (K_l, D) box keys

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
        self.sr_strides = {f: shapes[f].stride for f in self.sr_in_features}
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
        from ..data.two_view import build_two_view_mapper

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
        return OnlineDetectorView(self)

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
        m = cosine_momentum(self.base_momentum, iteration + 1, self.max_iter)
        for online, target in self._online_target_pairs():
            momentum_update(online, target, m)

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

    def forward(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        if not self.training:
            raise RuntimeError("DRCL is a pretraining model; convert it (drcl-convert) to run a detector")
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

        losses, new_keys = {}, {}
        if w["hcl"] > 0:
            loss, new_keys["hcl"] = self._holistic_loss(images_1, images_2, feats_1, feats_2, target_1, target_2,
                                                        image_ids, health)
            losses["loss_hcl"] = w["hcl"] * loss
        if w["lcl"] > 0:
            loss, new_keys["lcl"] = self._local_loss(feats_1, feats_2, target_1, target_2, boxes_1, boxes_2,
                                                     image_ids, health)
            losses["loss_lcl"] = w["lcl"] * loss
        if w["rpn"] > 0:
            gt = [Instances(size, gt_boxes=Boxes(b)) for size, b in zip(images_1.image_sizes, boxes_1)]
            _, rpn_losses = self.proposal_generator(images_1, feats_1, gt)
            losses.update({k: v * w["rpn"] for k, v in rpn_losses.items()})
        if w["ar"] > 0 or w["sr"] > 0:
            recon, hidden = self.decoder(feats_1, return_hidden=True)  # (N, 3, H/4, W/4) normalised pixels
            if w["ar"] > 0:
                losses["loss_ar"] = w["ar"] * self._appearance_loss(recon, images_1)
            if w["sr"] > 0:
                losses["loss_sr"] = w["sr"] * self._semantic_loss(recon, images_1, target_1, batched_inputs, health)
            if health is not None:
                self._decoder_health(recon, hidden, images_1, health)
        if health is not None:
            self._put_health(feats_1, boxes_1, health)

        # Queues advance after the losses used them, with the keys and image ids of all ranks
        # (gathered above); FeatureQueue never stores non-finite keys.
        if "hcl" in new_keys:
            self.queue_hcl.enqueue(*new_keys["hcl"])
        if "lcl" in new_keys:
            self.queue_lcl.enqueue(*new_keys["lcl"])
        return losses

    def _holistic_loss(self, images_1, images_2, feats_1, feats_2, target_1, target_2, image_ids, health):
        """HCL, symmetric over the views. Returns (loss, (keys (2·N_global, D), their image ids))."""
        f, s = self.hcl_in_feature, self.hcl_stride
        n = len(images_1.image_sizes)
        # Both views go through the MLPs as one batch of 2N: their BatchNorm then always sees >= 2
        # samples (one image per GPU works) and both views are normalised alike.
        pooled = torch.cat([_valid_mean(feats_1[f], images_1.image_sizes, s),
                            _valid_mean(feats_2[f], images_2.image_sizes, s)])  # (2N, C)
        z1, z2 = F.normalize(self.hcl_predictor(self.hcl_projector(pooled)), dim=1).split(n)  # (N, D) each
        with torch.no_grad():
            pooled_t = torch.cat([_valid_mean(target_1[f], images_1.image_sizes, s),
                                  _valid_mean(target_2[f], images_2.image_sizes, s)])
            k1, k2 = F.normalize(self.target.hcl_projector(pooled_t), dim=1).split(n)
            all_ids = concat_all_gather(image_ids)  # (N_global,)
        queue = self.queue_hcl.keys.clone()
        own = same_image_mask(image_ids, self.queue_hcl.ids.clone())  # (N, K): stale keys of the same image
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
        box_feats = torch.cat([self.roi_heads(feats_1, boxes_1), self.roi_heads(feats_2, boxes_2)])  # (2M, C)
        if health is not None:
            health["fc7_norm"] = box_feats.detach().norm(dim=1).mean() if m else box_feats.new_zeros(())
        q1, q2 = F.normalize(self.lcl_predictor(self.lcl_projector(box_feats)), dim=1).split(m)  # (M, D) each
        with torch.no_grad():
            t = self.target
            box_feats_t = torch.cat([t.roi_heads(target_1, boxes_1), t.roi_heads(target_2, boxes_2)])
            k1, k2 = F.normalize(t.lcl_projector(box_feats_t), dim=1).split(m)  # (M, D) each
            (all_k1, sizes), (all_k2, _) = gather_variable(k1), gather_variable(k2)  # (M_global, D)
            offset = sum(sizes[: comm.get_rank()])  # this rank's first box in the gathered list
            # Per box: its image id and its batch entry (global index of the view pair).
            per_box = torch.repeat_interleave(torch.arange(len(counts), device=self.device),
                                              torch.tensor(counts, device=self.device))  # (M,)
            entry = per_box + comm.get_rank() * len(counts)
            box_ids = image_ids[per_box]
            all_ids, _ = gather_variable(torch.stack([box_ids, entry], dim=1))  # (M_global, 2)
        queue = self.queue_lcl.keys.clone()
        own_queue = same_image_mask(box_ids, self.queue_lcl.ids.clone())  # (M, K)
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

    def _appearance_loss(self, recon, images):
        """L_AR: mean squared error to the normalised input average-pooled to the decoder's stride."""
        stride = self.decoder.out_stride
        target = F.avg_pool2d(images.tensor, stride)  # (N, 3, H/4, W/4)
        per_image = []
        for i, (h, w) in enumerate(images.image_sizes):  # unpadded region only
            hs, ws = h // stride, w // stride
            per_image.append(F.mse_loss(recon[i, :, :hs, :ws], target[i, :, :hs, :ws]))
        return torch.stack(per_image).mean()

    def _semantic_mask(self, batched_inputs, shape) -> torch.Tensor:
        """M: 1 for kept pixels, 0 on random patches (ratio sr_mask_ratio). (N, 1, H, W)

        Drawn per image from (image id, iteration), so the same image at the same iteration is
        masked alike on any number of ranks and after a resume.
        """
        n, _, h, w = shape
        p = self.sr_patch_size
        gh, gw = -(-h // p), -(-w // p)
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # outside a trainer (unit tests)
            iteration = 0
        masks = []
        for x in batched_inputs:
            g = torch.Generator().manual_seed((int(x.get("image_id", 0)) * 7919 + iteration) % (2**63 - 1))
            num_masked = int(round(self.sr_mask_ratio * gh * gw))
            grid = torch.ones(gh * gw)
            grid[torch.randperm(gh * gw, generator=g)[:num_masked]] = 0.0
            masks.append(grid.view(1, gh, gw))
        mask = torch.stack(masks).to(self.device)
        return F.interpolate(mask, scale_factor=p, mode="nearest")[:, :, :h, :w]

    def _semantic_loss(self, recon, images, target_1, batched_inputs, health=None):
        """L_SR = Σ_p ||f(x) - f(M(g(f(x))))||² with f(x) from the target (stop-gradient), each
        map normalised as SR_NORM says before the squared distance (see spatially_normalized_mse)."""
        full = F.interpolate(recon, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        masked = full * self._semantic_mask(batched_inputs, full.shape)  # masked patches -> mean pixel (0)
        feats = self.backbone(masked)  # gradients reach g and f
        distance = spatially_normalized_mse if self.sr_norm == "spatial" else l2_normalized_mse
        total, centered = 0.0, 0.0
        for level in self.sr_in_features:
            s = self.sr_strides[level]
            for i, (h, w) in enumerate(images.image_sizes):
                hs, ws = max(1, -(-h // s)), max(1, -(-w // s))
                online = feats[level][i: i + 1, :, :hs, :ws]  # (1, C, hs, ws)
                target = target_1[level][i: i + 1, :, :hs, :ws]
                total = total + distance(online, target) / len(images.image_sizes)
                if health is not None:  # the channel-L2 form with each map's per-channel offset removed
                    with torch.no_grad():
                        centered = centered + l2_normalized_mse(
                            online - online.mean(dim=(2, 3), keepdim=True),
                            target - target.mean(dim=(2, 3), keepdim=True)) / len(images.image_sizes)
        if health is not None:
            health["sr_centered"] = centered
        return total

    # ---- health signals (SPEC §7): what a falling loss cannot show ----------------------------
    @torch.no_grad()
    def _decoder_health(self, recon, hidden, images, health):
        """Share of live ReLUs in the decoder, correlation of g(f(x)) with the input at its stride,
        and the reconstruction's spatial std (0 for a constant image)."""
        stride = self.decoder.out_stride
        target = F.avg_pool2d(images.tensor, stride)
        h, w = (min(hw) for hw in zip(*images.image_sizes))
        h, w = max(1, h // stride), max(1, w // stride)  # the region every image fills
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
