"""Hooks shared by train_net.py and pretrain_net.py."""
from __future__ import annotations

import logging
import threading

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.samplers import DynamicRepeatFactorTrainingSampler

logger = logging.getLogger(__name__)

__all__ = ["TrainingSamplerHook", "find_train_sampler", "StopOnRequestHook", "TrainingStopped", "request_stop",
           "stopped_at_iteration"]


def find_train_sampler(data_loader):
    """The sampler inside a loader built by detectron2's build_detection_train_loader.

    The loader is a torch DataLoader over ToIterableDataset(.sampler), possibly wrapped by
    AspectRatioGroupedDataset / MapDataset (each keeps the inner object as `.dataset`).
    """
    obj, seen = data_loader, 0
    while obj is not None and seen < 8:
        sampler = getattr(obj, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_start_iter"):
            return sampler
        obj, seen = getattr(obj, "dataset", None), seen + 1
    return None


class TrainingSamplerHook(HookBase):
    """Keeps the training sampler (uniform, RFS or DRB) on the trainer's iteration; logs Dynamic Rebalancing.

    - before_train: tells the sampler the start iteration (0, or the resumed one). The loader's
      workers are forked at the first step, after this, so each worker's copy starts there too.
    - after_step: logs α_d, mean r_I and epoch length (Σ r_I) of the period in use to the
      EventStorage (metrics.json, TensorBoard), as `drb/alpha`, `drb/mean_repeat`, `drb/epoch_length`.
    - state_dict: the sampler position, saved in every checkpoint and checked on resume.
    """

    def __init__(self, sampler, total_batch_size: int):
        self.sampler = sampler
        self.total_batch_size = int(total_batch_size)
        # The DRB sampler itself, also when wrapped (e.g. by the pretraining PositionTaggedSampler).
        inner = getattr(sampler, "sampler", sampler)
        self._drb = inner if isinstance(inner, DynamicRepeatFactorTrainingSampler) else None

    def before_train(self):
        if self.sampler is None:
            return
        self.sampler.set_start_iter(self.trainer.start_iter)
        if self.trainer.start_iter:
            logger.info(
                f"Training sampler resumes at iteration {self.trainer.start_iter} "
                f"(global sample position {self.trainer.start_iter * self.total_batch_size})"
            )

    def after_step(self):
        if self._drb is None:
            return
        state = self._drb.state_at(self.trainer.iter)
        self.trainer.storage.put_scalars(
            **{"drb/alpha": state.alpha, "drb/mean_repeat": state.mean_repeat,
               "drb/epoch_length": state.epoch_length},
            smoothing_hint=False,
        )

    def _sampler_name(self):
        inner = getattr(self.sampler, "sampler", self.sampler)
        return type(inner).__name__ if inner is not None else None

    def state_dict(self):
        # iter+1 is the first iteration a resumed run trains (DefaultTrainer.resume_or_load).
        next_iter = self.trainer.iter + 1
        return {
            "sampler": self._sampler_name(),
            "total_batch_size": self.total_batch_size,
            "next_position": next_iter * self.total_batch_size,
        }

    def load_state_dict(self, state):
        if state.get("total_batch_size") not in (None, self.total_batch_size):
            logger.warning(
                f"Resuming with SOLVER.IMS_PER_BATCH={self.total_batch_size}, but the checkpoint was "
                f"trained with {state['total_batch_size']}: the sampler restarts at iteration x new "
                "batch, which is not the position the interrupted run reached."
            )
        name = self._sampler_name()
        if state.get("sampler") not in (None, name):
            logger.warning(f"Resuming with sampler {name}; the checkpoint used {state['sampler']}.")


# Set from a signal handler (the SLURM launcher's, at USR2); read by StopOnRequestHook.
_stop_requested = threading.Event()
_stopped_at: list[int] = []  # the iteration whose checkpoint StopOnRequestHook saved before stopping


class TrainingStopped(BaseException):
    """Raised by StopOnRequestHook once the checkpoint of the finished step is on disk.

    A BaseException, like KeyboardInterrupt: a requested stop, not an error for `except Exception`
    (detectron2's train loop would log it as "Exception during training").
    """

    def __init__(self, iteration: int):
        super().__init__(f"training stopped on request after iteration {iteration} (checkpoint saved)")
        self.iteration = iteration


def request_stop() -> None:
    """Ask the trainer of this process to checkpoint after its current step and stop (safe in a signal handler)."""
    _stop_requested.set()


def stopped_at_iteration() -> int | None:
    return _stopped_at[-1] if _stopped_at else None


class StopOnRequestHook(HookBase):
    """After a step, when request_stop() was called: save a checkpoint of that step, raise TrainingStopped.

    A signal stops training between steps, never in the middle of one, so a requeued job resumes
    from the last finished step (not from the last periodic checkpoint). Only the main process
    acts: it alone writes checkpoints and requeues, as submitit's handler has it; the other ranks
    wait in the next step's collectives until the requeue ends the job. On the last iteration the
    run finishes normally (final checkpoint, evaluation). Registered last, after the writers.
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def after_step(self):
        iteration = self.trainer.iter
        if not _stop_requested.is_set() or not comm.is_main_process() or iteration + 1 >= self.trainer.max_iter:
            return
        # The name and extra state of detectron2's PeriodicCheckpointer.
        self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        _stopped_at.append(iteration)
        _stop_requested.clear()  # a request stops one training run
        raise TrainingStopped(iteration)
