"""The pretraining trainer shared by 2DRCL, DetCo and MoCo v2 (pretrain_net.py).

It is the fine-tuning Trainer (atomic checkpoints, resumable samplers, CPU-aware DDP) with:
- a pretraining loader: the meta-architecture's mapper over DATASETS.TRAIN, the sampler named
  by DATALOADER.SAMPLER_TRAIN (Dynamic Rebalancing included), every random draw seeded by
  (SEED, sample position) so that a resumed run sees exactly the samples the uninterrupted
  one would have;
- the model's own random draws seeded by (SEED, iteration, rank) before each step;
- MODEL.WEIGHTS loaded into the online network only; the target/key network copies it when
  training starts from iteration 0, and follows by momentum afterwards (TargetNetworkHook);
- no evaluation (DATASETS.TEST is ignored);
- PRETRAIN.COMPILE: the model's encoders compiled with torch.compile on a GPU (eager on CPU).

The checkpoint holds the whole meta-architecture (online and target weights, queues and their
pointers as buffers), the optimizer, scheduler and iteration, and the sampler position.
"""
from __future__ import annotations

import logging

import torch
from detectron2.engine import HookBase, hooks
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..data.build import build_train_sampler, micro_batch_size
from ..data.seeded_loader import build_pretrain_loader
from .checkpoint import AtomicDetectionCheckpointer
from .hooks import TrainingSamplerHook, find_train_sampler
from .trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["PretrainTrainer", "TargetNetworkHook", "unwrap_model", "step_seed", "compile_pretraining_step"]


def unwrap_model(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """A distinct, reproducible torch seed for each (run seed, iteration, rank)."""
    return (seed * 1_000_003 + iteration * 1_009 + rank) % (2**63 - 1)


def compile_pretraining_step(model, mode: str = "default") -> bool:
    """PRETRAIN.COMPILE: torch.compile the model's compute-heavy modules in place
    (`model.compile_step(mode)`: names, parameters and checkpoints unchanged) when the model is on
    a GPU and Triton is installed. Otherwise log a warning and keep the eager model. Returns
    whether it compiled; compilation itself happens at the first forward."""
    from torch.utils._triton import has_triton

    if not hasattr(model, "compile_step"):
        logger.warning("PRETRAIN.COMPILE: %s has no compile_step; it runs eagerly", type(model).__name__)
        return False
    if model.device.type != "cuda":
        logger.warning("PRETRAIN.COMPILE is for GPUs (it removes launch overhead); the model is on %s "
                       "and runs eagerly", model.device)
        return False
    if not has_triton():
        logger.warning("PRETRAIN.COMPILE: Triton is not installed; the model runs eagerly")
        return False
    model.compile_step(mode)
    logger.info("PRETRAIN.COMPILE: encoders compiled with torch.compile(mode=%r)", mode)
    return True


class TargetNetworkHook(HookBase):
    """Starts the target (momentum) network as a copy of the online one, then updates it.

    before_train: at iteration 0 (not on resume, where the checkpoint holds the target), calls
    `model.init_target()`, after MODEL.WEIGHTS has been loaded into the online network.
    after_step: calls `model.update_target(iteration)` once per iteration, after the optimizer
    step (BYOL/AlignDet order). Models that update inside forward (MoCo) define neither hook.
    """

    def before_train(self):
        model = unwrap_model(self.trainer.model)
        if self.trainer.start_iter == 0 and hasattr(model, "init_target"):
            model.init_target()

    def after_step(self):
        model = unwrap_model(self.trainer.model)
        if hasattr(model, "update_target"):
            model.update_target(self.trainer.iter)


class PretrainTrainer(Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        model = unwrap_model(self.model)
        if hasattr(model, "checkpoint_meta"):  # lets drcl-convert recognise the method
            self.checkpointer.extra_state = {"drcl_d2": model.checkpoint_meta()}

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.PRETRAIN.COMPILE:
            compile_pretraining_step(model, cfg.PRETRAIN.COMPILE_MODE)
        return model

    @classmethod
    def check_inputs(cls, cfg):
        pass  # no classes and no evaluation; the loader stops after PRETRAIN.MAX_RETRIES bad images

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = cls.prebuilt_train_dataset(cfg)
        # Each pretraining meta-architecture knows its inputs (two box views, jigsaw patches...).
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if not hasattr(meta_arch, "build_mapper"):
            raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} is not a pretraining "
                             "meta-architecture (it has no build_mapper)")
        mapper, dataset = meta_arch.build_mapper(cfg, dataset)
        sampler = build_train_sampler(cfg, dataset)
        return build_pretrain_loader(
            dataset, sampler, mapper,
            seed=cfg.SEED, total_batch_size=micro_batch_size(cfg), num_workers=cfg.DATALOADER.NUM_WORKERS,
            max_retries=cfg.PRETRAIN.MAX_RETRIES,
        )

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            TrainingSamplerHook(find_train_sampler(self.data_loader), cfg.SOLVER.IMS_PER_BATCH),
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            TargetNetworkHook(),
        ]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.PRETRAIN.LOG_PERIOD))
        return ret

    def run_step(self):
        torch.manual_seed(step_seed(self.cfg.SEED, self.iter, comm.get_rank()))
        super().run_step()

    def resume_or_load(self, resume=True):
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        # A whole-model load would see every backbone key twice (online and target) and refuse;
        # MODEL.WEIGHTS initialises the online detector, under GeneralizedRCNN's names.
        if self.cfg.MODEL.WEIGHTS:
            online = unwrap_model(self.model).online_network()
            AtomicDetectionCheckpointer(online).load(self.cfg.MODEL.WEIGHTS)  # logs how much it set
        self.start_iter = 0

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return {}
