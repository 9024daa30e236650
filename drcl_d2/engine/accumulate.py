"""Gradient accumulation (SOLVER.ACCUM_STEPS): the papers' batch on fewer GPUs.

SOLVER.IMS_PER_BATCH stays the batch of one optimizer step (what the LR, the schedule and the
sampler positions refer to); each step runs ACCUM_STEPS forward/backward passes on micro-batches of
IMS_PER_BATCH / ACCUM_STEPS images (over all ranks), sums the gradients of losses divided by
ACCUM_STEPS, then steps the optimizer once. One trainer iteration is one optimizer step: the LR
schedule, checkpoints, DRB's α_d and the momentum schedules count optimizer steps.

What a micro-batch sees, and so what equals one step of the full batch:
- losses that are means over images (detectron2's detection losses with the same number of sampled
  anchors / RoIs per image; InfoNCE over queue negatives) give the same gradient, up to float
  summation order;
- BatchNorm normalises each micro-batch with its own statistics (as with fewer images per GPU):
  SyncBN over the ranks, or frozen BN, keeps the recipe closest;
- pretraining models are told the micro-batch position (``model.accumulation = (j, k)``): the
  momentum encoder / target network moves once per optimizer step, and the keys of all k
  micro-batches enter the queues together after the step, so every micro-batch of a step is
  contrasted against the same queue (see each model's docstring).
- in-batch negatives (2DRCL's LCL boxes of other images) come from the micro-batch only.
DDP synchronises gradients on the last micro-batch only (``no_sync`` before it).
"""
from __future__ import annotations

import contextlib
import time

import torch
from detectron2.engine import SimpleTrainer
from torch.nn.parallel import DistributedDataParallel

__all__ = ["AccumulatingTrainer", "set_accumulation_position"]


def set_accumulation_position(model, index: int, steps: int) -> None:
    """Tell a model that follows the accumulation protocol which micro-batch of the step comes next."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    if hasattr(model, "accumulation"):
        model.accumulation = (index, steps)


class AccumulatingTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer (or its AMP variant) whose step accumulates `accum_steps`
    micro-batches before one optimizer step; the metrics written are the micro-batch means."""

    def __init__(self, model, data_loader, optimizer, accum_steps: int, amp: bool = False,
                 precision: torch.dtype = torch.float16):
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        if hasattr(inner, "build_mapper") and not hasattr(inner, "accumulation"):
            raise NotImplementedError(
                f"SOLVER.ACCUM_STEPS > 1 with {type(inner).__name__}: this pretraining model does not follow "
                "the accumulation protocol (momentum and queue updates once per optimizer step)")
        super().__init__(model, data_loader, optimizer)
        self.accum_steps = int(accum_steps)
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp else None

    def _autocast(self):
        if self.grad_scaler is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.precision)

    def run_step(self):
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        k = self.accum_steps
        self.optimizer.zero_grad()
        data_time, mean_losses = 0.0, {}
        for j in range(k):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            set_accumulation_position(self.model, j, k)
            # Gradients are all-reduced once, with the last micro-batch's backward.
            sync = j == k - 1 or not isinstance(self.model, DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values()) / k
                (self.grad_scaler.scale(losses) if self.grad_scaler is not None else losses).backward()
            for name, value in loss_dict.items():
                mean_losses[name] = mean_losses.get(name, 0.0) + value.detach() / k
        set_accumulation_position(self.model, 0, k)  # the step is done: its keys may enter the queues
        self.after_backward()
        self._write_metrics(mean_losses, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
