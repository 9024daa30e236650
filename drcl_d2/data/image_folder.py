"""Unlabeled image folders as detectron2 datasets (DetCo / MoCo v2 pretraining on ImageNet).

``DATASETS.IMAGE_FOLDERS: [["imagenet_train", "/data/imagenet/train"]]`` registers every image file
under the folder (recursively, sorted by path, so image ids are stable) as one dataset dict::

    {"file_name": absolute path, "height": int | None, "width": int | None, "image_id": index,
     "annotations": []}

Heights and widths are read from the file headers with PIL (no decoding) when the dataset is
first loaded, with a thread pool (an ImageNet-size folder is about 1.28M header reads). A file
whose header cannot be read keeps ``None`` and is counted in one warning; the pretraining mapper
then fails to read it, logs it and the loader draws another image in its place.
Pretraining configs on such datasets set DATALOADER.FILTER_EMPTY_ANNOTATIONS False (every image
here has no annotations).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..utils import name_some

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image_folder", "register_image_folder",
           "register_image_folders_from_config"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def list_images(folder: str) -> list[str]:
    """Every file under `folder` whose extension is an image's (case-insensitive), sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder not found: {folder}")
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(paths)


def _image_size(path: str) -> tuple[int | None, int | None]:
    """(height, width) from the header, or (None, None) when it cannot be read."""
    try:
        with Image.open(path) as im:
            width, height = im.size
        return height, width
    except (OSError, SyntaxError, ValueError):
        return None, None


def load_image_folder(folder: str, num_threads: int = 16) -> list[dict]:
    """Dataset dicts (no annotations) for every image under `folder`; see the module doc."""
    paths = list_images(os.path.abspath(folder))
    if not paths:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        sizes = list(pool.map(_image_size, paths, chunksize=256))
    unreadable = [p for p, (h, _) in zip(paths, sizes) if h is None]
    if unreadable:
        logger.warning(f"{folder}: {len(unreadable)} of {len(paths)} image files have an unreadable header; "
                       f"training skips them when it meets them: {name_some(unreadable)}")
    logger.info(f"Loaded {len(paths)} unlabeled images from {folder}")
    return [
        {"file_name": path, "height": h, "width": w, "image_id": i, "annotations": []}
        for i, (path, (h, w)) in enumerate(zip(paths, sizes))
    ]


def register_image_folder(name: str, folder: str) -> None:
    """Register the images under `folder` as dataset `name` (loaded lazily, on first use)."""
    folder = os.path.abspath(folder)
    if name in DatasetCatalog.list():
        if getattr(MetadataCatalog.get(name), "image_root", None) == folder:
            return  # the same registration again (setup() called twice)
        raise ValueError(f"Dataset name {name!r} is already registered with other files")
    DatasetCatalog.register(name, lambda: load_image_folder(folder))
    MetadataCatalog.get(name).set(image_root=folder, evaluator_type="none")


def register_image_folders_from_config(cfg) -> list[str]:
    """Register every [name, folder] pair of cfg.DATASETS.IMAGE_FOLDERS; returns the names."""
    names = []
    for i, entry in enumerate(cfg.DATASETS.get("IMAGE_FOLDERS", [])):
        if len(entry) != 2:
            raise ValueError(f"DATASETS.IMAGE_FOLDERS[{i}] must be [name, folder], got {list(entry)}")
        name, folder = entry
        register_image_folder(name, folder)
        names.append(name)
    return names
