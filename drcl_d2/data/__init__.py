from .build import TRAIN_SAMPLERS, build_lvis_train_loader, build_train_dataset, build_train_sampler
from .datasets import load_lvis_format_json, register_datasets_from_config, register_lvis_format
from .rebalance import CategoryStatistics, DynamicRepeatFactors, alpha_at
from .samplers import (
    DynamicRepeatFactorTrainingSampler,
    RebalanceState,
    ResumableRepeatFactorTrainingSampler,
    ResumableTrainingSampler,
)
