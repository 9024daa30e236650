"""Small heads of the pretraining methods: projection / prediction MLPs and the AR decoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, NaiveSyncBatchNorm, ShapeSpec, get_norm
from torch import nn

__all__ = ["MLPHead", "ReconstructionDecoder"]


class SyncBatchNorm1d(NaiveSyncBatchNorm):
    """BatchNorm over (N, C) whose statistics cover the whole global batch on every rank.

    detectron2's NaiveSyncBatchNorm (works with gloo on CPU and NCCL) on (N, C, 1, 1), weighted
    by each rank's N, so a run on several ranks normalises exactly as one rank with the same
    global batch would. One process: plain BatchNorm.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, stats_mode="N")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C)
        return super().forward(x[:, :, None, None])[:, :, 0, 0]


class MLPHead(nn.Sequential):
    """Linear(in -> hidden), BatchNorm, ReLU, Linear(hidden -> out) (2DRCL paper's MLP heads)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            SyncBatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class ReconstructionDecoder(nn.Module):
    """g in L_AR = ||x - g(f(x))||²: a light FPN-style decoder from the pyramid to an RGB image.

    Every level in `in_features` is reduced to `dim` channels, upsampled to the finest level
    (stride `out_stride`) and summed; a 3x3 conv -> norm -> ReLU block and a 3x3 conv then predict
    3 channels in the normalised pixel space. Output (N, 3, H/out_stride, W/out_stride).

    The norm before the ReLU is what keeps the decoder alive (SPEC §7): without it the fused
    block's ReLUs all switch off within tens of iterations and g(f(x)) becomes a constant image
    (active fraction 0.51 -> 0.0). `norm` is any detectron2 norm name ("GN" by default, per
    image, so it behaves alike on any number of ranks); "" restores the unnormalised block.
    """

    def __init__(self, input_shape: dict[str, ShapeSpec], in_features: list[str], dim: int = 128,
                 out_stride: int = 4, norm: str = "GN"):
        super().__init__()
        strides = {f: input_shape[f].stride for f in in_features}
        if out_stride not in strides.values():
            raise ValueError(f"No input level has stride {out_stride} (have {strides})")
        self.in_features = in_features
        self.out_stride = out_stride
        self.lateral = nn.ModuleDict({f: Conv2d(input_shape[f].channels, dim, 1) for f in in_features})
        # GN: 32 groups as detectron2, fewer when a narrow decoder has fewer channels.
        fuse_norm = nn.GroupNorm(math.gcd(32, dim), dim) if norm == "GN" else get_norm(norm, dim)
        self.fuse = Conv2d(dim, dim, 3, padding=1, bias=not norm, norm=fuse_norm, activation=F.relu)
        self.predict = Conv2d(dim, 3, 3, padding=1)

    def forward(self, features: dict[str, torch.Tensor], return_hidden: bool = False):
        """features: FPN maps -> (N, 3, H/4, W/4); with return_hidden also the fused block's
        post-ReLU activations (N, dim, H/4, W/4), whose share of non-zeros is the health signal."""
        size = max((features[f].shape[-2:] for f in self.in_features), key=lambda hw: hw[0] * hw[1])
        x = sum(
            F.interpolate(self.lateral[f](features[f]), size=size, mode="bilinear", align_corners=False)
            if features[f].shape[-2:] != size else self.lateral[f](features[f])
            for f in self.in_features
        )
        hidden = self.fuse(x)
        recon = self.predict(hidden)
        return (recon, hidden) if return_hidden else recon
