"""Dataset mappers for fine-tuning and evaluation."""
from __future__ import annotations

import logging

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SkippingDatasetMapper", "image_mode"]


def image_mode(file_name: str) -> str:
    """PIL's mode of an image file ("RGB", "I;16", "F"...), or "?" when it cannot be opened."""
    try:
        with Image.open(file_name) as im:
            return im.mode
    except Exception:  # only for a message: never fail here
        return "?"


class SkippingDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper that skips (returns None for) an image it cannot use, with a warning.

    Skipped, with a warning naming the file and image id (the mapper returns None and detectron2's
    MapDataset draws another image in its place; the test loader drops the image, see
    :func:`drcl_d2.data.build.build_checked_test_loader`):

    - a file that cannot be read or decoded (truncated, not an image, deleted since loading): PIL
      reports it as OSError (UnidentifiedImageError, "image file is truncated") or SyntaxError;
    - an image whose decoded size differs from the json's height/width (detectron2's
      SizeMismatchError): its boxes cannot be trusted, and raising would kill every rank mid-run;
    - an image that decodes to a constant image, e.g. a 16-bit or float file that PIL's
      conversion to 8-bit RGB clips to one value: training on it would be silent garbage.

    ``max_bad_in_a_row`` unusable images in a row (or every image of a dataset smaller than that,
    ``dataset_size``) stop training with an error, as pretraining does (PRETRAIN.MAX_RETRIES + 1),
    before MapDataset runs out of images to draw ("Sample larger than population").
    Other errors propagate.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, max_bad_in_a_row: int = 21, **kwargs):
        super().__init__(is_train, **kwargs)
        self.max_bad_in_a_row = max_bad_in_a_row
        self.dataset_size: int | None = None  # set by the loader that owns the mapper
        self._bad_in_a_row = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if "PRETRAIN" in cfg:  # add_drcl_config's key; detectron2's own config lacks it
            ret["max_bad_in_a_row"] = cfg.PRETRAIN.MAX_RETRIES + 1
        return ret

    def __call__(self, dataset_dict):
        reason = None
        try:
            out = super().__call__(dataset_dict)
        except SizeMismatchError as e:
            reason = f"{e} (python -m drcl_d2.tools.check_dataset lists every such image)"
        except (OSError, SyntaxError) as e:
            reason = f"unreadable ({type(e).__name__}: {e})"
        else:
            image = out["image"]
            if image.numel() and image.min() == image.max():
                mode = image_mode(dataset_dict["file_name"])
                reason = (f"it decodes to a constant image (every pixel {int(image.flatten()[0])}; PIL mode "
                          f"{mode!r}): convert it to 8-bit RGB (detectron2 clips 16-bit and float images)")
            else:
                self._bad_in_a_row = 0
                return out
        self._bad_in_a_row += 1
        logger.warning(
            f"Skipping image {dataset_dict.get('file_name')} (image id {dataset_dict.get('image_id')}): {reason}"
        )
        limit = min(self.max_bad_in_a_row, self.dataset_size or self.max_bad_in_a_row)
        if self.is_train and self._bad_in_a_row >= limit:
            raise RuntimeError(f"{self._bad_in_a_row} images in a row could not be used (unreadable, wrong size or "
                               "constant; see the warnings above): check the training images "
                               "(python -m drcl_d2.tools.check_dataset JSON IMAGE_ROOT)")
        return None
