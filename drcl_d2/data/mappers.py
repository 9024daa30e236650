"""Dataset mappers for fine-tuning."""
from __future__ import annotations

import logging

from detectron2.data import DatasetMapper

logger = logging.getLogger(__name__)

__all__ = ["CheckedDatasetMapper"]


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper that survives an unreadable image file.

    A file that cannot be read or decoded (truncated, not an image, deleted since loading) is
    skipped with a warning naming the file and image id: the mapper returns None and detectron2's
    MapDataset draws another image in its place. PIL reports such files as OSError
    (UnidentifiedImageError, "image file is truncated") or SyntaxError; other errors propagate.
    """

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:
            logger.warning(
                f"Skipping unreadable image {dataset_dict.get('file_name')} "
                f"(image id {dataset_dict.get('image_id')}): {type(e).__name__}: {e}"
            )
            return None
