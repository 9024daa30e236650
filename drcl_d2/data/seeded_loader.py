"""Pretraining data loader whose every random draw is a function of (seed, sample position).

Exact resume needs more than the sampler's position: the augmentation of each sample must be the
same in a resumed run. detectron2's mappers draw from per-worker global RNGs whose state depends
on how many workers ran what; here the sampler tags each index with its global position p and
the mapper receives ``numpy.random.default_rng([seed, p])``, so sample p is identical whatever
the number of workers or ranks, and after ``--resume``.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import build_batch_data_loader
from detectron2.data.common import DatasetFromList

logger = logging.getLogger(__name__)

__all__ = ["PositionTaggedSampler", "SeededMapDataset", "build_pretrain_loader"]


class PositionTaggedSampler(torchdata.Sampler):
    """Wraps one of drcl_d2's resumable samplers; yields (global position, dataset index)."""

    def __init__(self, sampler):
        if not hasattr(sampler, "set_start_iter"):
            raise TypeError(f"{type(sampler).__name__} cannot resume: use one of drcl_d2.data.samplers")
        self.sampler = sampler

    def set_start_iter(self, start_iter: int) -> None:
        self.sampler.set_start_iter(start_iter)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        first, step = s._start_position() + s._rank, s._world_size
        for k, index in enumerate(s):
            yield first + k * step, index


class SeededMapDataset(torchdata.Dataset):
    """dataset[(position, index)] = mapper(dicts[index], rng(seed, position)).

    A mapper returning None (unreadable image, no box survives the crops) is retried on other
    images drawn from the same rng, so the replacement is deterministic too; every skip is logged
    with the image id, and more than `max_retries` failures in a row stop training with an error.
    """

    def __init__(self, dataset_dicts: list[dict], mapper: Callable, seed: int, max_retries: int = 20):
        self._dicts = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self._mapper = mapper
        self._seed = int(seed) % (2**63)
        self._max_retries = max_retries
        self.num_skipped = 0

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, tagged):
        position, index = tagged
        rng = np.random.default_rng([self._seed, int(position)])
        for attempt in range(self._max_retries + 1):
            record = self._dicts[index]
            out = self._mapper(record, rng)
            if out is not None:
                return out
            self.num_skipped += 1
            logger.warning(f"Pretraining sample at position {position}: image id {record.get('image_id')} "
                           f"({record.get('file_name')}) gave no usable views; drawing another image "
                           f"({self.num_skipped} skipped in this worker so far)")
            index = int(rng.integers(len(self._dicts)))
        raise RuntimeError(f"{self._max_retries + 1} images in a row gave no usable views at position {position}: "
                           "check the images and the box source (see the warnings above)")


def build_pretrain_loader(dataset_dicts: list[dict], sampler, mapper: Callable, *, seed: int,
                          total_batch_size: int, num_workers: int, max_retries: int = 20):
    """A detectron2 batch loader over SeededMapDataset; batches are lists of mapper outputs."""
    dataset = SeededMapDataset(dataset_dicts, mapper, seed, max_retries)
    return build_batch_data_loader(
        dataset, PositionTaggedSampler(sampler), total_batch_size,
        aspect_ratio_grouping=False, num_workers=num_workers,
        # The loader's own generator: creating its iterator then draws nothing from the global
        # RNG, which the trainer seeds per step (a resumed run creates it at another step).
        seed=seed % (2**63),
    )
