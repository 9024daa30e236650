"""Colour augmentation pieces shared by the pretraining mappers (2DRCL two views, DetCo / MoCo v2).

Each mapper draws its own parameters from its seeded rng (the order of draws is part of each
mapper's reproducible stream); these helpers only apply them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["apply_color_jitter", "blur_kernel_size"]

_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


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
