"""Training data for fine-tuning: dataset list, sampler by name, loader (DefaultTrainer plugs it in)."""
from __future__ import annotations

import logging

from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from .mappers import SkippingDatasetMapper
from .rebalance import CategoryStatistics, DynamicRepeatFactors
from .samplers import (
    DynamicRepeatFactorTrainingSampler,
    ResumableRepeatFactorTrainingSampler,
    ResumableTrainingSampler,
)

logger = logging.getLogger(__name__)

TRAIN_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "DynamicRepeatFactorTrainingSampler")

__all__ = ["TRAIN_SAMPLERS", "micro_batch_size", "build_train_sampler", "build_train_dataset", "build_lvis_train_loader",
           "build_checked_test_loader", "drb_max_iter"]


def drb_max_iter(cfg) -> int:
    """T_max of α_d: DATALOADER.DRB.MAX_ITER, or SOLVER.MAX_ITER when it is 0."""
    return cfg.DATALOADER.DRB.MAX_ITER or cfg.SOLVER.MAX_ITER


def micro_batch_size(cfg) -> int:
    """Images per loader batch over all ranks: SOLVER.IMS_PER_BATCH / SOLVER.ACCUM_STEPS."""
    batch, steps, world = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUM_STEPS, comm.get_world_size()
    if steps < 1:
        raise ValueError(f"SOLVER.ACCUM_STEPS must be >= 1, got {steps}")
    if batch % (steps * world) != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({batch}) must be divisible by SOLVER.ACCUM_STEPS ({steps}) x the number "
            f"of processes ({world}): each of the {steps} micro-batches of a step gives every process the "
            "same number of images"
        )
    return batch // steps


def build_train_dataset(cfg) -> list[dict]:
    """The training list as detectron2 builds it (empty images filtered per config; detectron2 stops
    on an empty list: "No valid data found")."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)


def build_train_sampler(cfg, dataset_dicts: list[dict]):
    """The sampler named by DATALOADER.SAMPLER_TRAIN over the same (filtered) list the loader uses.

    All three resume at the trainer's iteration (see drcl_d2.data.samplers).
    """
    name = cfg.DATALOADER.SAMPLER_TRAIN
    seed = cfg.SEED  # detectron2 uses cfg.SEED as is, -1 included
    batch = cfg.SOLVER.IMS_PER_BATCH
    logger.info(f"Using training sampler {name}")
    if name == "TrainingSampler":
        return ResumableTrainingSampler(len(dataset_dicts), total_batch_size=batch, seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
        return ResumableRepeatFactorTrainingSampler(factors, total_batch_size=batch, seed=seed)
    if name == "DynamicRepeatFactorTrainingSampler":
        factors = DynamicRepeatFactors(CategoryStatistics.from_dataset_dicts(dataset_dicts),
                                       repeat_thresh=cfg.DATALOADER.REPEAT_THRESHOLD,
                                       instance_frequency=cfg.DATALOADER.DRB.INSTANCE_FREQUENCY,
                                       sqrt=cfg.DATALOADER.REPEAT_SQRT)
        return DynamicRepeatFactorTrainingSampler(factors, total_batch_size=batch, max_iter=drb_max_iter(cfg),
                                                  period=cfg.DATALOADER.DRB.PERIOD, seed=seed)
    raise ValueError(f"Unknown DATALOADER.SAMPLER_TRAIN {name!r}; drcl_d2 supports {', '.join(TRAIN_SAMPLERS)}")


def build_lvis_train_loader(cfg, mapper=None, dataset: list[dict] | None = None):
    """detectron2's train loader with a resumable sampler chosen by name (uniform, RFS, DRB).

    `dataset`: the list of :func:`build_train_dataset`, when the caller already built it.
    """
    if dataset is None:
        dataset = build_train_dataset(cfg)
    sampler = build_train_sampler(cfg, dataset)
    if mapper is None:
        mapper = SkippingDatasetMapper(cfg, is_train=True)
    if isinstance(mapper, SkippingDatasetMapper):
        mapper.dataset_size = len(dataset)  # all images unusable: a clear error, not an empty draw
    # Loader batches are micro-batches (SOLVER.ACCUM_STEPS); the sampler counts whole steps.
    return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler, mapper=mapper,
                                        total_batch_size=micro_batch_size(cfg))


class _Skipped(dict):
    """What the test loader's mapper yields for an image it skipped (dropped before the model)."""


class _MarkSkipped:
    """Wraps a mapper: None becomes a _Skipped marker, so that MapDataset does not replace the
    image by another one (an image evaluated twice) and the loader can drop it instead."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        out = self.mapper(dataset_dict)
        return out if out is not None else _Skipped(image_id=dataset_dict.get("image_id"))


class SkippingTestLoader:
    """Iterates a test loader without the images its mapper skipped; len() is the loader's."""

    def __init__(self, loader, dataset_name: str):
        self.loader, self.dataset_name = loader, dataset_name

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        skipped = 0
        for batch in self.loader:
            kept = [d for d in batch if not isinstance(d, _Skipped)]
            skipped += len(batch) - len(kept)
            if kept:
                yield kept
        if skipped:
            logger.warning(f"{skipped} image(s) of {self.dataset_name} were skipped (see the warnings above): they "
                           "have no detections, so their objects count as misses in the evaluation")


def build_checked_test_loader(cfg, dataset_name: str):
    """detectron2's test loader with the checked mapper: an unusable image is skipped with a warning
    naming its file and image id, instead of stopping the evaluation at the end of training."""
    mapper = _MarkSkipped(SkippingDatasetMapper(cfg, is_train=False))
    loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
    return SkippingTestLoader(loader, dataset_name)
