"""Dynamic Rebalancing (DRB, 2DRCL paper): repeat factors that move from image-level to
instance-level category frequencies as training advances.

Everything here is one vectorised pass over precomputed (image, category) pairs, so a recompute at
LVIS scale (100k images, 1.27M instances) costs milliseconds; see benchmarks/bench_rebalance.py.

Formulas (SPEC §1), for category c:
    f_im(c) = (#images containing c) / N                       (detectron2's RFS frequency)
    f_in(c) = (#instances of c) / (#instances)                 ("fraction_of_instances", default)
            or (#instances of c) / N                           ("instances_per_image")
    alpha_d = T / T_max
    f_c     = f_im * f_in / (alpha_d * f_im + (1 - alpha_d) * f_in)   (weighted harmonic mean)
    r_c     = max(1, sqrt(t / f_c))
    r_I     = max_{c in I} r_c   (1 for an image without annotations)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

INSTANCE_FREQUENCY_MODES = ("fraction_of_instances", "instances_per_image")


@dataclass
class CategoryStatistics:
    """Per-category counts of a training set, and its (image, category) incidence.

    Attributes:
        num_images: N, images in the (filtered) training list the loader indexes.
        category_ids: (C,) dataset category ids, sorted.
        image_counts: (C,) images that contain each category.
        instance_counts: (C,) annotations of each category.
        pair_image: (P,) image index of each distinct (image, category) pair.
        pair_category: (P,) position in `category_ids` of each pair.
    """

    num_images: int
    category_ids: np.ndarray
    image_counts: np.ndarray
    instance_counts: np.ndarray
    pair_image: np.ndarray
    pair_category: np.ndarray

    @property
    def num_instances(self) -> int:
        return int(self.instance_counts.sum())

    @classmethod
    def from_dataset_dicts(cls, dataset_dicts: Sequence[dict]) -> "CategoryStatistics":
        """Statistics of a detectron2 dataset list (after empty-image filtering, as RFS sees it)."""
        image_index, category_id = [], []
        for i, record in enumerate(dataset_dicts):
            anns = record.get("annotations", ())
            image_index.extend([i] * len(anns))
            category_id.extend(ann["category_id"] for ann in anns)
        return cls.from_instances(len(dataset_dicts), np.asarray(image_index, dtype=np.int64),
                                  np.asarray(category_id, dtype=np.int64))

    @classmethod
    def from_instances(cls, num_images: int, image_index: np.ndarray, category_id: np.ndarray) -> "CategoryStatistics":
        """Statistics from one (image index, category id) row per instance."""
        if num_images <= 0:
            raise ValueError("Dynamic Rebalancing needs a non-empty training set (got 0 images).")
        image_index = np.asarray(image_index, dtype=np.int64)
        category_id = np.asarray(category_id, dtype=np.int64)
        category_ids, cat_pos = np.unique(category_id, return_inverse=True)
        instance_counts = np.bincount(cat_pos, minlength=len(category_ids))
        # Distinct (image, category) pairs: an image counts once per category, as in RFS.
        pair_key = np.unique(image_index * len(category_ids) + cat_pos)
        pair_image, pair_category = np.divmod(pair_key, max(len(category_ids), 1))
        image_counts = np.bincount(pair_category, minlength=len(category_ids))
        return cls(int(num_images), category_ids, image_counts, instance_counts, pair_image, pair_category)

    def image_frequency(self) -> np.ndarray:
        """f_im(c): fraction of images that contain c. (C,) float64."""
        return self.image_counts / self.num_images

    def instance_frequency(self, mode: str = "fraction_of_instances") -> np.ndarray:
        """f_in(c), either per instance or per image (see module doc). (C,) float64."""
        if mode == "fraction_of_instances":
            return self.instance_counts / max(self.num_instances, 1)
        if mode == "instances_per_image":
            return self.instance_counts / self.num_images
        raise ValueError(
            f"Unknown DATALOADER.DRB.INSTANCE_FREQUENCY {mode!r}; expected one of {INSTANCE_FREQUENCY_MODES}"
        )


def dynamic_category_frequency(f_im: np.ndarray, f_in: np.ndarray, alpha: float) -> np.ndarray:
    """f_c = f_im·f_in / (α·f_im + (1−α)·f_in), the α-weighted harmonic mean of f_im and f_in.

    The endpoints are returned exactly (α=0 -> f_im, α=1 -> f_in) so that DRB at α=0 reproduces
    detectron2's RFS factors bit for bit; the closed form can differ from them in the last ulp.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha_d must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return f_im.astype(np.float64, copy=True)
    if alpha == 1.0:
        return f_in.astype(np.float64, copy=True)
    return f_im * f_in / (alpha * f_im + (1.0 - alpha) * f_in)


def category_repeat_factors(category_frequency: np.ndarray, repeat_thresh: float, sqrt: bool = True) -> np.ndarray:
    """r_c = max(1, sqrt(t / f_c)) (or t / f_c without sqrt, as detectron2's REPEAT_SQRT). (C,)"""
    with np.errstate(divide="ignore"):
        ratio = repeat_thresh / category_frequency
    ratio = np.sqrt(ratio) if sqrt else ratio
    # A category absent from the data (f=0) never raises an image's factor.
    return np.where(category_frequency > 0, np.maximum(1.0, ratio), 1.0)


def image_repeat_factors(stats: CategoryStatistics, category_factors: np.ndarray) -> torch.Tensor:
    """r_I = max over the categories of image I of r_c; 1 for images without annotations.

    Returns a float32 tensor of N factors, the type detectron2's RepeatFactorTrainingSampler takes.
    """
    per_image = np.ones(stats.num_images, dtype=np.float64)
    if len(stats.pair_image):
        # Pairs are sorted by image (np.unique on image*C+cat), so a segmented max is one reduceat.
        starts = np.flatnonzero(np.r_[True, np.diff(stats.pair_image) != 0])
        seg_max = np.maximum.reduceat(category_factors[stats.pair_category], starts)
        per_image[stats.pair_image[starts]] = seg_max
    return torch.from_numpy(per_image).to(torch.float32)


class DynamicRepeatFactors:
    """r_I(α_d) for a training set: the statistics are computed once, each α a vectorised pass."""

    def __init__(self, stats: CategoryStatistics, repeat_thresh: float,
                 instance_frequency: str = "fraction_of_instances", sqrt: bool = True):
        self.stats = stats
        self.repeat_thresh = float(repeat_thresh)
        self.sqrt = sqrt
        self.instance_frequency_mode = instance_frequency
        self.f_im = stats.image_frequency()
        self.f_in = stats.instance_frequency(instance_frequency)

    def category_factors(self, alpha: float) -> np.ndarray:
        """r_c for every category of `stats.category_ids` at α_d = alpha. (C,) float64."""
        f_c = dynamic_category_frequency(self.f_im, self.f_in, alpha)
        return category_repeat_factors(f_c, self.repeat_thresh, self.sqrt)

    def __call__(self, alpha: float) -> torch.Tensor:
        """r_I for every image at α_d = alpha. (N,) float32."""
        return image_repeat_factors(self.stats, self.category_factors(alpha))


def alpha_at(iteration: int, max_iter: int) -> float:
    """α_d = T / T_max, clamped to [0, 1]."""
    if max_iter <= 0:
        raise ValueError(f"T_max (SOLVER.MAX_ITER or DATALOADER.DRB.MAX_ITER) must be > 0, got {max_iter}")
    return min(1.0, max(0.0, iteration / max_iter))
