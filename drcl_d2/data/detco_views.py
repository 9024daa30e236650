"""DetCo / MoCo v2 inputs: two global views and (DetCo) two jigsaw patch sets per image.

:class:`DetCoViewMapper` turns one dataset dict into

* **two global views** (MoCo v2 augmentation, paper): RandomResizedCrop to ``view_size`` over
  ``view_scale`` of the image area (aspect ratio log-uniform in [3/4, 4/3]), colour jitter
  (brightness, contrast, saturation, hue; the four ops in a random order, as torchvision's
  ColorJitter) with probability ``color_jitter_prob``, grayscale, Gaussian blur, horizontal flip,
  then optionally RandAugment (``randaugment_num_ops`` > 0);
* **two jigsaw patch sets** (DetCo, paper), each drawn independently of the views and of each
  other: a crop covering ``patch_crop_scale`` of the image area, resized to a
  ``canvas_size`` x ``canvas_size`` canvas, flip / colour / blur as a global view (one draw per set,
  on the canvas), cut into a 3x3 grid of ``cell_size`` cells, the cells shuffled, and one random
  ``patch_size`` x ``patch_size`` crop inside each cell.

**Randomness.** Every random draw comes from the ``rng`` argument (a ``numpy.random.Generator``
seeded by the loader from (cfg.SEED, global sample position), :mod:`drcl_d2.data.seeded_loader`). The
mapper only samples parameters from ``rng`` and applies deterministic
``torchvision.transforms.v2.functional`` ops; it never touches numpy's, torch's or Python's
global generators, so a resumed run maps every sample exactly as the uninterrupted one did.

**Bad input.**
* Grayscale, palette, CMYK or RGBA files are converted to RGB by detectron2's ``read_image``
  (format "RGB"), EXIF orientation applied.
* Images smaller than a crop are upsampled: RandomResizedCrop resizes whatever it cropped to the
  view / canvas size, as torchvision does (a 1x1 image gives a flat view).
* An unreadable file (missing, truncated, not an image) makes the mapper return None with a
  warning; the loader then draws another image from the same rng.

Blur kernel (choice): the Gaussian is truncated at 3 sigma, ``k = 2 * ceil(3 sigma) + 1`` (13 px at
sigma = 2; MoCo v2's PIL blur is not truncated, the difference is below one grey level).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from detectron2.config import configurable
from detectron2.data import detection_utils as utils

from .photometric import (apply_color_jitter, blur_kernel_size, check_color_jitter, gaussian_blur, jitter_factors,
                          to_format)

logger = logging.getLogger(__name__)

__all__ = ["DetCoViewMapper", "random_resized_crop_params", "rand_augment", "GRID"]

GRID = 3  # jigsaw grid side: 3 x 3 = 9 patches per set (paper)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect ratios (torchvision's default)
RANDAUGMENT_BINS = 31  # magnitude bins of torchvision's RandAugment (magnitudes 0..30)


def random_resized_crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop as torchvision's RandomResizedCrop.get_params, from rng.

    Ten tries of area ~ U(scale) x image area and log-uniform aspect ratio; then the central crop
    with the aspect ratio clamped to ``ratio`` (whole image when it already fits).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


# RandAugment: torchvision's op space (name, magnitude at bin 30, signed), re-implemented so that
# the choice of ops, signs and nothing else is drawn from rng.
_RA_OPS = (
    ("identity", 0.0, False), ("shear_x", 0.3, True), ("shear_y", 0.3, True),
    ("translate_x", 150.0 / 331.0, True), ("translate_y", 150.0 / 331.0, True), ("rotate", 30.0, True),
    ("brightness", 0.9, True), ("color", 0.9, True), ("contrast", 0.9, True), ("sharpness", 0.9, True),
    ("posterize", 4.0, False), ("solarize", 255.0, False), ("autocontrast", 0.0, False),
    ("equalize", 0.0, False),
)
_RA_ADJUST = {"brightness": TF.adjust_brightness, "color": TF.adjust_saturation, "contrast": TF.adjust_contrast,
              "sharpness": TF.adjust_sharpness}


def rand_augment(img: torch.Tensor, rng: np.random.Generator, num_ops: int, magnitude: int) -> torch.Tensor:
    """torchvision's RandAugment(num_ops, magnitude) on a uint8 (3, H, W) tensor, draws from rng."""
    frac = magnitude / (RANDAUGMENT_BINS - 1)
    _, h, w = img.shape
    for _ in range(num_ops):
        name, top, signed = _RA_OPS[int(rng.integers(len(_RA_OPS)))]
        v = top * frac
        if signed and rng.random() < 0.5:
            v = -v
        if name in ("shear_x", "shear_y"):
            shear = [math.degrees(math.atan(v)), 0.0]
            img = TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                            shear=shear if name == "shear_x" else shear[::-1])
        elif name in ("translate_x", "translate_y"):
            shift = [int(v * w), 0] if name == "translate_x" else [0, int(v * h)]
            img = TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
        elif name == "rotate":
            img = TF.rotate(img, v)
        elif name in _RA_ADJUST:
            img = _RA_ADJUST[name](img, 1.0 + v)
        elif name == "posterize":
            img = TF.posterize(img, int(8 - round(v)))
        elif name == "solarize":
            img = TF.solarize(img, 255.0 - v)
        elif name in ("autocontrast", "equalize"):
            img = getattr(TF, name)(img)
    return img


class DetCoViewMapper:
    """Map a dataset dict to DetCo / MoCo v2 inputs (see the module doc). Call as ``mapper(d, rng)``.

    Output (uint8 tensors, channels in ``image_format`` order; None for an unreadable file)::

        {"image_id", "file_name",
         "view_q": (3, S, S), "view_k": (3, S, S),           # S = view_size
         "patches_q": (9, 3, P, P), "patches_k": (9, 3, P, P)}  # P = patch_size; only with_patches

    ``view_q`` / ``patches_q`` feed the query encoder, ``view_k`` / ``patches_k`` the key encoder.
    """

    @configurable
    def __init__(
        self,
        *,
        image_format: str = "RGB",
        with_patches: bool = True,
        view_size: int = 224,
        view_scale: Sequence[float] = (0.2, 1.0),
        patch_crop_scale: Sequence[float] = (0.6, 1.0),
        canvas_size: int = 255,
        cell_size: int = 85,
        patch_size: int = 64,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        flip_prob: float = 0.5,
        randaugment_num_ops: int = 0,
        randaugment_magnitude: int = 9,
    ):
        """
        Args:
            image_format: "RGB" or "BGR": channel order of the outputs (the model's PIXEL_MEAN order).
            with_patches: produce the two jigsaw patch sets (DetCo); False for MoCo v2.
            view_size, view_scale: global views' RandomResizedCrop output side and area range.
            patch_crop_scale, canvas_size, cell_size, patch_size: the jigsaw patch sets
                (canvas_size must be 3 x cell_size, patch_size <= cell_size).
            color_jitter: (brightness, contrast, saturation, hue) strengths.
            color_jitter_prob, grayscale_prob, blur_prob, flip_prob: probabilities.
            blur_sigma: Gaussian blur sigma range [min, max].
            randaugment_num_ops, randaugment_magnitude: RandAugment on the global views (0 ops: off).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"DetCoViewMapper needs INPUT.FORMAT 'RGB' or 'BGR', got {image_format!r}")
        if canvas_size != GRID * cell_size:
            raise ValueError(
                f"INPUT.DETCO.PATCH_CANVAS_SIZE ({canvas_size}) must be {GRID} x CELL_SIZE ({cell_size})")
        if not 0 < patch_size <= cell_size:
            raise ValueError(f"INPUT.DETCO.PATCH_SIZE ({patch_size}) must be in 1..CELL_SIZE ({cell_size})")
        if view_size <= 0:
            raise ValueError(f"INPUT.DETCO.VIEW_SIZE must be > 0, got {view_size}")
        for name, rng_ in (("VIEW_SCALE", view_scale), ("PATCH_CROP_SCALE", patch_crop_scale)):
            if len(rng_) != 2 or not 0 < rng_[0] <= rng_[1] <= 1:
                raise ValueError(f"INPUT.DETCO.{name} must be [min, max] with 0 < min <= max <= 1, got {rng_}")
        if not 0 <= randaugment_magnitude < RANDAUGMENT_BINS:
            raise ValueError(f"INPUT.DETCO.RANDAUGMENT_MAGNITUDE must be in 0..{RANDAUGMENT_BINS - 1}")
        self.image_format = image_format
        self.with_patches = bool(with_patches)
        self.view_size = int(view_size)
        self.view_scale = tuple(float(v) for v in view_scale)
        self.patch_crop_scale = tuple(float(v) for v in patch_crop_scale)
        self.canvas_size, self.cell_size, self.patch_size = int(canvas_size), int(cell_size), int(patch_size)
        self.color_jitter = check_color_jitter(color_jitter, "INPUT.DETCO.COLOR_JITTER")
        self.color_jitter_prob = float(color_jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.flip_prob = float(flip_prob)
        self.randaugment_num_ops = int(randaugment_num_ops)
        self.randaugment_magnitude = int(randaugment_magnitude)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.INPUT.DETCO
        return {"image_format": cfg.INPUT.FORMAT, "with_patches": cfg.MODEL.DETCO.LOCAL,
                "view_size": d.VIEW_SIZE, "view_scale": d.VIEW_SCALE, "patch_crop_scale": d.PATCH_CROP_SCALE,
                "canvas_size": d.PATCH_CANVAS_SIZE, "cell_size": d.CELL_SIZE, "patch_size": d.PATCH_SIZE,
                "color_jitter": d.COLOR_JITTER, "color_jitter_prob": d.COLOR_JITTER_PROB,
                "grayscale_prob": d.GRAYSCALE_PROB, "blur_prob": d.BLUR_PROB, "blur_sigma": d.BLUR_SIGMA,
                "flip_prob": d.FLIP_PROB, "randaugment_num_ops": d.RANDAUGMENT_NUM_OPS,
                "randaugment_magnitude": d.RANDAUGMENT_MAGNITUDE}

    # -- the pieces ---------------------------------------------------------------------------

    def _photometric_and_flip(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """MoCo v2's order: colour jitter (p; torchvision's ColorJitter: factors, then the order of the
        four ops), grayscale (p), Gaussian blur (p), horizontal flip (p)."""
        if rng.random() < self.color_jitter_prob:
            img = apply_color_jitter(img, jitter_factors(rng, self.color_jitter), rng.permutation(4))
        if rng.random() < self.grayscale_prob:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if rng.random() < self.blur_prob:
            sigma = float(rng.uniform(*self.blur_sigma))
            k = blur_kernel_size(img.shape[-2], img.shape[-1], sigma, max_fraction=None)
            if k >= 3:
                img = gaussian_blur(img, k, sigma)
        if rng.random() < self.flip_prob:
            img = TF.horizontal_flip(img)
        return img

    def global_view(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One MoCo v2 view of an RGB uint8 (3, H, W) image -> (3, view_size, view_size)."""
        top, left, h, w = random_resized_crop_params(img.shape[1], img.shape[2], self.view_scale, CROP_RATIO, rng)
        view = TF.resized_crop(img, top, left, h, w, [self.view_size, self.view_size], antialias=True)
        view = self._photometric_and_flip(view, rng)
        if self.randaugment_num_ops:
            view = rand_augment(view, rng, self.randaugment_num_ops, self.randaugment_magnitude)
        return view

    def patch_set(self, img: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """One jigsaw set of an RGB uint8 (3, H, W) image -> (patches (9, 3, P, P), cell order (9,)).

        Patch j is cut from grid cell ``order[j]`` (row-major index on the canvas): the cells are
        shuffled by a permutation drawn from rng.
        """
        top, left, h, w = random_resized_crop_params(img.shape[1], img.shape[2], self.patch_crop_scale,
                                                     CROP_RATIO, rng)
        canvas = TF.resized_crop(img, top, left, h, w, [self.canvas_size, self.canvas_size], antialias=True)
        canvas = self._photometric_and_flip(canvas, rng)
        order = rng.permutation(GRID * GRID)
        cell, size = self.cell_size, self.patch_size
        patches = []
        for index in order:
            row, col = divmod(int(index), GRID)
            y = row * cell + int(rng.integers(0, cell - size + 1))
            x = col * cell + int(rng.integers(0, cell - size + 1))
            patches.append(canvas[:, y:y + size, x:x + size])
        return torch.stack(patches), order

    # -- the mapper -----------------------------------------------------------------------------

    def __call__(self, dataset_dict: dict, rng: np.random.Generator) -> dict | None:
        try:
            image = utils.read_image(dataset_dict["file_name"], format="RGB")  # (H, W, 3) uint8, RGB
        except (OSError, SyntaxError, ValueError) as e:
            logger.warning(f"Skipping unreadable image {dataset_dict.get('file_name')} "
                           f"(image id {dataset_dict.get('image_id')}): {type(e).__name__}: {e}")
            return None
        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W)
        out = {"image_id": dataset_dict.get("image_id"), "file_name": dataset_dict["file_name"]}
        out["view_q"] = to_format(self.global_view(img, rng), self.image_format)
        out["view_k"] = to_format(self.global_view(img, rng), self.image_format)
        if self.with_patches:
            out["patches_q"] = to_format(self.patch_set(img, rng)[0], self.image_format)
            out["patches_k"] = to_format(self.patch_set(img, rng)[0], self.image_format)
        return out
