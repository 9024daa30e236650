"""Two augmented views of one image with a shared box set: the 2DRCL pretraining input.

:class:`TwoViewBoxMapper` turns one dataset dict into two MoCo-v2/BYOL-style views and one box set
that is moved consistently by each view's geometric transform, so that box ``i`` of view 1 and box
``i`` of view 2 cover the same object:

1. **Boxes.** Candidates (XYXY, original image pixels) come from the ground truth (used
   class-agnostically; crowd boxes skipped), from a proposals file (:mod:`drcl_d2.data.proposals`)
   or are random; up to ``num_boxes`` of them are chosen at random, without replacement.
2. **Geometry, per view, independently.** Resize the shortest edge to a size drawn from
   ``min_size`` (longest edge capped at ``max_size``), crop a random window covering a fraction of
   the resized area drawn uniformly from ``crop_area`` with an aspect ratio drawn log-uniformly
   from [3/4, 4/3] (as torchvision's RandomResizedCrop; sides clipped to the image), then flip
   horizontally with p = 0.5. The crop is *not* resized back: a view's size is the crop's.
3. **Leaving a view.** A box is transformed with the view's TransformList (unclipped), then
   clipped to the view. It stays in a view when ``clipped area / unclipped area >= min_visible``
   and both clipped sides are ``>= min_box_size`` pixels. A box that fails in either view is
   dropped from both. When no box survives, new crops are drawn (the same chosen boxes), up to
   ``max_attempts`` tries; then the mapper returns None and the caller replaces the image.
4. **Photometric, per view** ``v`` (0 or 1 indexes the two-valued settings): colour jitter with
   probability ``color_jitter_prob`` (the four ops in an order drawn from the rng, as
   torchvision's ColorJitter), grayscale (``grayscale_prob``), Gaussian blur (``blur_prob``; sigma
   drawn from ``blur_sigma``, in view pixels; kernel side: :func:`blur_kernel_size`), solarisation
   at 128 (``solarize_prob``).

**Randomness.** Every random draw comes from the ``rng`` argument (a ``numpy.random.Generator``
the caller seeds from (cfg.SEED, global sample position)); the mapper never touches numpy's,
torch's or Python's global generators, so a resumed run maps each sample exactly as before.
Only deterministic transforms are used: detectron2's Resize/Crop/HFlip transforms and
``torchvision.transforms.v2.functional`` ops with rng-drawn parameters.
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
from detectron2.data.transforms import (
    CropTransform,
    HFlipTransform,
    ResizeShortestEdge,
    ResizeTransform,
    TransformList,
)
from detectron2.structures import BoxMode
from PIL import Image

from .detco_views import CROP_RATIO  # drawn log-uniformly, as torchvision's RandomResizedCrop
from .photometric import (apply_color_jitter, blur_kernel_size, check_color_jitter, gaussian_blur, jitter_factors,
                          to_format)
from .proposals import load_proposals_from_config

logger = logging.getLogger(__name__)

__all__ = ["TwoViewBoxMapper", "blur_kernel_size"]

BOX_SOURCES = ("gt", "proposals", "random")
SOLARIZE_THRESHOLD = 128  # uint8 images


def _pair(value, name: str) -> tuple[float, float]:
    """A per-view setting: one value for both views, or [view1, view2]."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be one number or [view1, view2], got {value}")
    return value


def _range(value, name: str, low: float = 0.0, high: float = math.inf) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {value}")
    return value


class TwoViewBoxMapper:
    """Map one dataset dict to two augmented views and a box set shared by both (see module doc).

    Call as ``mapper(dataset_dict, rng)``; returns None for an unreadable image file or when no box
    survives both views after ``max_attempts`` crops. Output::

        {"image_id", "file_name", "height", "width",   # original image
         "image_v1": uint8 (C, H1, W1), "image_v2": uint8 (C, H2, W2),   # channels in image_format
         "boxes_v1": float32 (n, 4), "boxes_v2": float32 (n, 4),         # XYXY in each view's pixels
         "num_candidate_boxes": int}                                      # boxes the source offered
    """

    @configurable
    def __init__(
        self,
        *,
        image_format: str,
        min_size: Sequence[int],
        max_size: int,
        num_boxes: int = 8,
        box_source: str = "gt",
        proposals: dict[int, np.ndarray] | None = None,
        crop_area=(0.5, 1.0),
        min_visible: float = 0.5,
        min_box_size: float = 8,
        random_box_side=(0.1, 0.5),
        color_jitter=(0.4, 0.4, 0.2, 0.1),
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_prob=(1.0, 0.1),
        blur_sigma=(0.1, 2.0),
        solarize_prob=(0.0, 0.2),
        max_attempts: int = 10,
        min_size_sampling: str = "choice",
    ):
        """The settings the module doc's steps name, and:

        Args:
            image_format: "RGB" or "BGR" (detectron2's INPUT.FORMAT), the views' channel order.
            min_size_sampling: as detectron2's ResizeShortestEdge ("choice": one of min_size; "range":
                an int in [min, max]).
            proposals: with box_source "proposals", image id -> (n, 4) XYXY float array, original pixels.
            random_box_side: random boxes' sides as a fraction of the image side, [min, max].
            color_jitter: (brightness, contrast, saturation, hue) strengths.
            blur_prob, solarize_prob: per view [view1, view2] (or one number for both).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"TwoViewBoxMapper needs INPUT.FORMAT 'RGB' or 'BGR', got {image_format!r}")
        if box_source not in BOX_SOURCES:
            raise ValueError(f"INPUT.TWO_VIEW.BOX_SOURCE must be one of {BOX_SOURCES}, got {box_source!r}")
        if box_source == "proposals" and proposals is None:
            raise ValueError("INPUT.TWO_VIEW.BOX_SOURCE is 'proposals' but no proposals were given: load them "
                             "with drcl_d2.data.proposals (INPUT.TWO_VIEW.PROPOSAL_FILES) and pass proposals=")
        if min_size_sampling not in ("choice", "range"):
            raise ValueError(f"min_size_sampling must be 'choice' or 'range', got {min_size_sampling!r}")
        min_size = tuple(int(s) for s in ((min_size,) if isinstance(min_size, int) else min_size))
        if not min_size or min(min_size) <= 0:
            raise ValueError(f"min_size must hold positive sizes, got {min_size}")
        if min_size_sampling == "range" and len(min_size) != 2:
            raise ValueError(f"min_size_sampling 'range' needs min_size [min, max], got {min_size}")
        if int(num_boxes) < 1 or int(max_attempts) < 1:
            raise ValueError(f"num_boxes and max_attempts must be >= 1, got {num_boxes}, {max_attempts}")
        self.image_format = image_format
        self.min_size = min_size
        self.min_size_sampling = min_size_sampling
        self.max_size = int(max_size)
        self.num_boxes = int(num_boxes)
        self.box_source = box_source
        self.proposals = proposals
        self.crop_area = _range(crop_area, "crop_area", 1e-6, 1.0)
        self.min_visible = float(min_visible)
        self.min_box_size = float(min_box_size)
        self.random_box_side = _range(random_box_side, "random_box_side", 1e-6, 1.0)
        self.color_jitter = check_color_jitter(color_jitter, "color_jitter")
        self.color_jitter_prob = float(color_jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = _pair(blur_prob, "blur_prob")
        self.blur_sigma = _range(blur_sigma, "blur_sigma", 1e-6)
        self.solarize_prob = _pair(solarize_prob, "solarize_prob")
        self.max_attempts = int(max_attempts)

    @classmethod
    def from_config(cls, cfg, proposals: dict[int, np.ndarray] | None = None) -> dict:
        """Constructor arguments from INPUT.FORMAT, INPUT.MIN/MAX_SIZE_TRAIN and INPUT.TWO_VIEW.*.

        With BOX_SOURCE "proposals", pass the proposals loaded (and checked against the dataset)
        by :func:`drcl_d2.data.proposals.load_proposals_from_config`.
        """
        tv = cfg.INPUT.TWO_VIEW
        return {"image_format": cfg.INPUT.FORMAT, "min_size": tuple(cfg.INPUT.MIN_SIZE_TRAIN),
                "max_size": cfg.INPUT.MAX_SIZE_TRAIN, "min_size_sampling": cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                "num_boxes": tv.NUM_BOXES, "box_source": tv.BOX_SOURCE, "proposals": proposals,
                "crop_area": tv.CROP_AREA, "min_visible": tv.MIN_VISIBLE, "min_box_size": tv.MIN_BOX_SIZE,
                "random_box_side": tv.RANDOM_BOX_SIDE, "color_jitter": tv.COLOR_JITTER,
                "color_jitter_prob": tv.COLOR_JITTER_PROB, "grayscale_prob": tv.GRAYSCALE_PROB,
                "blur_prob": tv.BLUR_PROB, "blur_sigma": tv.BLUR_SIGMA, "solarize_prob": tv.SOLARIZE_PROB,
                "max_attempts": tv.MAX_ATTEMPTS}

    def _candidate_boxes(self, dataset_dict: dict, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 4) float64 XYXY candidate boxes in original image pixels, clipped to the image."""
        if self.box_source == "gt":
            boxes = [
                BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
                for ann in dataset_dict.get("annotations", [])
                if not ann.get("iscrowd", 0)  # a crowd box is a region of many objects
            ]
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        elif self.box_source == "proposals":
            image_id = dataset_dict["image_id"]
            if image_id not in self.proposals:
                # check_proposals_against_images drops such images: reaching here is a setup bug.
                raise KeyError(f"no proposals for image id {image_id} ({dataset_dict.get('file_name')}): "
                               "filter the dataset with drcl_d2.data.proposals.check_proposals_against_images")
            boxes = np.asarray(self.proposals[image_id], dtype=np.float64).reshape(-1, 4)
        else:  # random: num_boxes boxes with sides a random fraction of the image's sides
            n = self.num_boxes
            bw = rng.uniform(*self.random_box_side, size=n) * w
            bh = rng.uniform(*self.random_box_side, size=n) * h
            x0 = rng.uniform(0.0, 1.0, size=n) * (w - bw)
            y0 = rng.uniform(0.0, 1.0, size=n) * (h - bh)
            boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)
        return boxes.clip(0, [w, h, w, h])

    def _view_boxes(self, boxes: np.ndarray, tfm: TransformList, vh: int, vw: int):
        """Boxes (n, 4) moved into a view (vh, vw): (clipped boxes (n, 4), kept mask (n,))."""
        moved = tfm.apply_box(boxes)  # (n, 4) XYXY, not clipped (a new array)
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        clipped = moved.clip(0, [vw, vh, vw, vh])
        cw = clipped[:, 2] - clipped[:, 0]
        ch = clipped[:, 3] - clipped[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            visible = np.where(area > 0, cw * ch / area, 0.0)
        keep = (visible >= self.min_visible) & (cw >= self.min_box_size) & (ch >= self.min_box_size)
        return clipped, keep

    def _sample_view(self, h: int, w: int, rng: np.random.Generator) -> tuple[TransformList, int, int]:
        """Resize -> crop -> maybe flip, with parameters from rng: (transform, view h, view w)."""
        if self.min_size_sampling == "range":
            short = int(rng.integers(self.min_size[0], self.min_size[1] + 1))
        else:
            short = int(self.min_size[rng.integers(len(self.min_size))])
        rh, rw = ResizeShortestEdge.get_output_shape(h, w, short, self.max_size)
        area = rh * rw * rng.uniform(*self.crop_area)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw = min(max(int(round(math.sqrt(area * ratio))), 1), rw)
        ch = min(max(int(round(math.sqrt(area / ratio))), 1), rh)
        x0 = int(rng.integers(0, rw - cw + 1))
        y0 = int(rng.integers(0, rh - ch + 1))
        flip = rng.random() < 0.5
        tfms = [ResizeTransform(h, w, rh, rw, Image.BILINEAR), CropTransform(x0, y0, cw, ch, rw, rh)]
        if flip:
            tfms.append(HFlipTransform(cw))
        return TransformList(tfms), ch, cw

    def _make_view(self, image: np.ndarray, tfm: TransformList, view: int, rng) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) uint8 view in image_format: the geometry of tfm, then the
        MoCo v2 / BYOL colour ops with parameters from rng."""
        img = torch.from_numpy(np.ascontiguousarray(tfm.apply_image(image).transpose(2, 0, 1)))  # (3, h, w)
        # Every draw happens whether or not its op runs, so the stream's length is fixed.
        jitter = rng.random() < self.color_jitter_prob
        order = rng.permutation(4)
        factors = jitter_factors(rng, self.color_jitter)
        if jitter:
            img = apply_color_jitter(img, factors, order, strengths=self.color_jitter)
        if rng.random() < self.grayscale_prob:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        blur = rng.random() < self.blur_prob[view]
        sigma = float(rng.uniform(*self.blur_sigma))
        k = blur_kernel_size(img.shape[-2], img.shape[-1], sigma)
        if blur and k > 0:
            img = gaussian_blur(img, k, sigma)
        if rng.random() < self.solarize_prob[view]:
            img = TF.solarize(img, threshold=SOLARIZE_THRESHOLD)
        return to_format(img, self.image_format)

    def __call__(self, dataset_dict: dict, rng: np.random.Generator) -> dict | None:
        """Two views and shared boxes of one image, or None (unreadable, or no box survives)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        file_name = dataset_dict["file_name"]
        image_id = dataset_dict.get("image_id")
        try:
            image = utils.read_image(file_name, format="RGB")  # (H, W, 3) uint8; colour ops need RGB
        except (OSError, SyntaxError) as e:  # PIL's errors for unreadable / undecodable files
            logger.warning(f"Skipping unreadable image {file_name} (image id {image_id}): {type(e).__name__}: {e}")
            return None
        record = dict(dataset_dict)  # check_image_size fills height/width in: keep the input intact
        utils.check_image_size(record, image)
        h, w = image.shape[:2]

        candidates = self._candidate_boxes(record, h, w, rng)  # (N, 4)
        n_cand = len(candidates)
        if n_cand == 0:
            logger.debug(f"image id {image_id}: no candidate boxes ({self.box_source})")
            return None
        chosen = candidates[rng.choice(n_cand, size=min(n_cand, self.num_boxes), replace=False)]

        for _ in range(self.max_attempts):
            tfm1, h1, w1 = self._sample_view(h, w, rng)
            tfm2, h2, w2 = self._sample_view(h, w, rng)
            boxes1, keep1 = self._view_boxes(chosen, tfm1, h1, w1)
            boxes2, keep2 = self._view_boxes(chosen, tfm2, h2, w2)
            keep = keep1 & keep2  # a box leaving either view leaves both
            if keep.any():
                break
        else:
            logger.debug(f"image id {image_id}: no box survived {self.max_attempts} pairs of crops")
            return None
        # The class doc's output; view 1 is drawn first (a dict display evaluates in order).
        return {"image_id": image_id, "file_name": file_name, "height": record["height"], "width": record["width"],
                "image_v1": self._make_view(image, tfm1, 0, rng), "image_v2": self._make_view(image, tfm2, 1, rng),
                "boxes_v1": torch.as_tensor(boxes1[keep], dtype=torch.float32),
                "boxes_v2": torch.as_tensor(boxes2[keep], dtype=torch.float32), "num_candidate_boxes": n_cand}


def build_two_view_mapper(cfg, dataset_dicts: list[dict]):
    """The 2DRCL mapper and the pretraining list it serves.

    With BOX_SOURCE "proposals", images the proposals files do not cover are dropped from the
    list (one counted warning, see drcl_d2.data.proposals) before the sampler indexes it.
    """
    proposals = None
    if cfg.INPUT.TWO_VIEW.BOX_SOURCE == "proposals":
        proposals, dataset_dicts, _ = load_proposals_from_config(cfg, dataset_dicts)
    return TwoViewBoxMapper(cfg, proposals=proposals), dataset_dicts
