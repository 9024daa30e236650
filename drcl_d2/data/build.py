"""Training data for fine-tuning: dataset list, sampler by name, loader (DefaultTrainer plugs it in)."""
from __future__ import annotations

import logging

from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .mappers import CheckedDatasetMapper
from .rebalance import CategoryStatistics, DynamicRepeatFactors
from .samplers import (
    DynamicRepeatFactorTrainingSampler,
    ResumableRepeatFactorTrainingSampler,
    ResumableTrainingSampler,
)

logger = logging.getLogger(__name__)

TRAIN_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "DynamicRepeatFactorTrainingSampler")

__all__ = ["TRAIN_SAMPLERS", "build_train_sampler", "build_train_dataset", "build_lvis_train_loader",
           "drb_max_iter"]


def drb_max_iter(cfg) -> int:
    """T_max of α_d: DATALOADER.DRB.MAX_ITER, or SOLVER.MAX_ITER when it is 0."""
    return cfg.DATALOADER.DRB.MAX_ITER or cfg.SOLVER.MAX_ITER


def build_train_dataset(cfg) -> list[dict]:
    """The training list as detectron2 builds it (empty images filtered per config)."""
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    if not dataset:
        raise ValueError(f"The training datasets {tuple(cfg.DATASETS.TRAIN)} hold no images after filtering")
    return dataset


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
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
        )
        return ResumableRepeatFactorTrainingSampler(factors, total_batch_size=batch, seed=seed)
    if name == "DynamicRepeatFactorTrainingSampler":
        factors = DynamicRepeatFactors(
            CategoryStatistics.from_dataset_dicts(dataset_dicts),
            repeat_thresh=cfg.DATALOADER.REPEAT_THRESHOLD,
            instance_frequency=cfg.DATALOADER.DRB.INSTANCE_FREQUENCY,
            sqrt=cfg.DATALOADER.REPEAT_SQRT,
        )
        return DynamicRepeatFactorTrainingSampler(
            factors,
            total_batch_size=batch,
            max_iter=drb_max_iter(cfg),
            period=cfg.DATALOADER.DRB.PERIOD,
            seed=seed,
        )
    raise ValueError(
        f"Unknown DATALOADER.SAMPLER_TRAIN {name!r}; drcl_d2 supports {', '.join(TRAIN_SAMPLERS)}"
    )


def build_lvis_train_loader(cfg, mapper=None):
    """detectron2's train loader with a resumable sampler chosen by name (uniform, RFS, DRB)."""
    dataset = build_train_dataset(cfg)
    sampler = build_train_sampler(cfg, dataset)
    if mapper is None:
        mapper = CheckedDatasetMapper(cfg, is_train=True)
    return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler, mapper=mapper)
