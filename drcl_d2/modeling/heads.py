"""Small heads of the pretraining methods: projection / prediction MLPs and the AR decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, NaiveSyncBatchNorm, ShapeSpec
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
    (stride `out_stride`) and summed; two 3x3 convs then predict 3 channels in the normalised
    pixel space. Output (N, 3, H/out_stride, W/out_stride).
    """

    def __init__(self, input_shape: dict[str, ShapeSpec], in_features: list[str], dim: int = 128, out_stride: int = 4):
        super().__init__()
        strides = {f: input_shape[f].stride for f in in_features}
        if out_stride not in strides.values():
            raise ValueError(f"No input level has stride {out_stride} (have {strides})")
        self.in_features = in_features
        self.out_stride = out_stride
        self.lateral = nn.ModuleDict({f: Conv2d(input_shape[f].channels, dim, 1) for f in in_features})
        self.fuse = Conv2d(dim, dim, 3, padding=1, activation=F.relu)
        self.predict = Conv2d(dim, 3, 3, padding=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        size = max((features[f].shape[-2:] for f in self.in_features), key=lambda hw: hw[0] * hw[1])
        x = sum(
            F.interpolate(self.lateral[f](features[f]), size=size, mode="bilinear", align_corners=False)
            if features[f].shape[-2:] != size else self.lateral[f](features[f])
            for f in self.in_features
        )
        return self.predict(self.fuse(x))  # (N, 3, H/4, W/4)
