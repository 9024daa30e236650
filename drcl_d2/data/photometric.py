"""Colour augmentation pieces shared by the pretraining mappers (2DRCL two views, DetCo / MoCo v2).

Each mapper draws its own parameters from its seeded rng (the order of draws is part of each
mapper's reproducible stream); these helpers apply them, or draw one named group of them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

__all__ = ["apply_color_jitter", "blur_kernel_size", "check_color_jitter", "gaussian_blur", "jitter_factors",
           "to_format"]

_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def check_color_jitter(strengths: Sequence[float], name: str) -> tuple:
    """(brightness, contrast, saturation, hue) strengths as floats, each >= 0 and hue <= 0.5."""
    strengths = tuple(float(v) for v in strengths)
    if len(strengths) != 4 or min(strengths) < 0 or strengths[3] > 0.5:
        raise ValueError(f"{name} must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                         f"got {strengths}")
    return strengths


def jitter_factors(rng, strengths: Sequence[float]) -> tuple:
    """torchvision ColorJitter's parameters, drawn from rng in this order: brightness, contrast and
    saturation factors uniform in [max(0, 1 - s), 1 + s] for strength s, hue shift in [-h, h]."""
    b, c, s, h = strengths
    return (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))


def apply_color_jitter(img: torch.Tensor, factors: Sequence[float], order: Sequence[int],
                       strengths: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """torchvision's ColorJitter with drawn parameters: brightness, contrast, saturation factors and
    hue shift (`factors`) applied in `order`; an op whose strength is 0 is the identity and skipped."""
    for i in order:
        if strengths[i] > 0:
            img = _JITTER_OPS[i](img, float(factors[i]))
    return img


def blur_kernel_size(height: int, width: int, sigma: float, max_fraction: float | None = 0.1) -> int:
    """Odd Gaussian kernel side for a (height, width) image and a blur sigma (pixels).

    The kernel spans +-3 sigma (2 * ceil(3 sigma) + 1; the tails beyond hold < 0.3 % of the mass),
    at most `max_fraction` of the shorter side when given (BYOL's 23 px on 224 px crops) and at
    least 3; it is capped so that the reflect padding (k // 2) stays inside the image. Tying the
    kernel to sigma keeps blurring cheap on detection-sized views: an 81 px kernel on an 800 px
    view costs ~40x a 13 px one for the same sigma <= 2 blur. Returns 0 when the image is too
    small to blur (shorter side < 2).
    """
    short = min(height, width)
    if short < 2:
        return 0
    k = 2 * math.ceil(3 * sigma) + 1
    if max_fraction is not None:
        k = min(k, int(round(max_fraction * short)))
    k = max(3, k)
    k = k if k % 2 == 1 else k + 1
    return min(k, 2 * (short - 1) + 1)  # reflect padding needs k // 2 < short


def to_format(rgb: torch.Tensor, image_format: str) -> torch.Tensor:
    """A (..., 3, H, W) RGB tensor in the channel order of image_format ("RGB" or "BGR"), contiguous."""
    return (rgb.flip(-3) if image_format == "BGR" else rgb).contiguous()


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, the same truncated kernel) on a (C, H, W) image,
    computed as two 1-D passes of shifted, weighted sums instead of a convolution.

    Why: the pretraining crops change size every sample, and a CPU convolution goes through
    oneDNN, which compiles and caches a kernel plan per input shape (up to 1024 plans, ~2 MB
    each): data-loader workers grew by ~1.1 MB per blurred sample (benchmarks/bench_loader_memory.py).
    Shifted sums use only elementwise kernels, which keep no per-shape state. The result equals
    torchvision's up to float summation order (uint8: at most one grey level apart).
    """
    k = int(kernel_size)
    if k < 3 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
    half = k // 2
    x = torch.linspace(-half, half, steps=k, dtype=torch.float32)
    weights = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    weights = (weights / weights.sum()).tolist()  # (k,) torchvision's 1-D kernel
    out = img if img.is_floating_point() else img.to(torch.float32)
    height, width = out.shape[-2:]
    # (C, H + 2h, W + 2h): reflect padding as torchvision pads before its convolution.
    padded = F.pad(out[None], [half, half, half, half], mode="reflect")[0]
    rows = padded[..., 0:width] * weights[0]  # (C, H + 2h, W) horizontal pass
    for t in range(1, k):
        rows.add_(padded[..., t:t + width], alpha=weights[t])
    out = rows[..., 0:height, :] * weights[0]  # (C, H, W) vertical pass
    for t in range(1, k):
        out.add_(rows[..., t:t + height, :], alpha=weights[t])
    if not img.is_floating_point():
        out = out.round_().to(img.dtype)
    return out
