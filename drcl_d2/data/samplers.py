"""Training samplers that know the trainer's iteration.

detectron2's samplers run inside each data-loader worker and restart from their seed on
``--resume``. Here every sampler maps a *global sample position* p to an index deterministically,
and p = iteration × total_batch_size; so a sampler told the start iteration (``set_start_iter``,
done by :class:`drcl_d2.engine.hooks.TrainingSamplerHook` before the loader's workers start) resumes
exactly where the interrupted run stopped, with any number of workers and ranks.

Sharding is detectron2's: rank r takes global positions r, r + W, r + 2W, ...; detectron2's
``ToIterableDataset`` then splits a rank's stream over its workers in chunks.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm
from torch.utils.data import Sampler

from .rebalance import DynamicRepeatFactors, alpha_at

logger = logging.getLogger(__name__)

__all__ = [
    "DynamicRepeatFactorTrainingSampler",
    "ResumableTrainingSampler",
    "ResumableRepeatFactorTrainingSampler",
    "RebalanceState",
]


class _StartIterMixin:
    """Skip the samples of iterations already trained: global position start_iter × batch."""

    _start_iter: int = 0
    _total_batch_size: int = 1

    def set_start_iter(self, start_iter: int) -> None:
        self._start_iter = int(start_iter)

    def _start_position(self) -> int:
        return self._start_iter * self._total_batch_size


class _ResumableDetectron2Sampler(_StartIterMixin):
    """A detectron2 sampler (argument, then shuffle, seed) whose own index stream starts at the
    start position: rank r takes positions start + r, start + r + W, ..."""

    def __init__(self, arg, *, total_batch_size: int, shuffle: bool = True, seed: Optional[int] = None):
        super().__init__(arg, shuffle=shuffle, seed=seed)
        self._total_batch_size = int(total_batch_size)

    def __iter__(self):
        start = self._start_position() + self._rank
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class ResumableTrainingSampler(_ResumableDetectron2Sampler, TrainingSampler):
    """detectron2's TrainingSampler (uniform; argument: the dataset size) that resumes at the
    trainer's iteration."""


class ResumableRepeatFactorTrainingSampler(_ResumableDetectron2Sampler, RepeatFactorTrainingSampler):
    """detectron2's RepeatFactorTrainingSampler (RFS; argument: the repeat factors) that resumes at
    the trainer's iteration. The index stream is detectron2's own; a resumed run replays (without
    loading images) the positions it has already trained on.
    """


@dataclass(frozen=True)
class RebalanceState:
    """What the DRB sampler uses during one recompute period (logged by TrainingSamplerHook)."""

    period_index: int
    alpha: float  # α_d of the period
    mean_repeat: float  # mean r_I over the training images
    epoch_length: float  # Σ r_I: expected images per pass over the data


class DynamicRepeatFactorTrainingSampler(_StartIterMixin, Sampler):
    """Repeat-factor sampling whose factors follow Dynamic Rebalancing (SPEC §1).

    Training is cut into periods of ``period`` iterations. Period k uses
    α_d = k·period / T_max and its factors r_I(α_d); its ``period × total_batch_size`` global
    samples are drawn as detectron2's RFS draws an epoch (stochastic rounding of r_I, then a random
    permutation; more passes when one is not enough) from a generator seeded by (seed, k). So a
    period's indices depend only on (seed, k): resuming at any iteration costs one period, not a
    replay of the run, and every worker and rank agrees on α_d without talking to the trainer.
    """

    def __init__(self, repeat_factors: DynamicRepeatFactors, *, total_batch_size: int, max_iter: int, period: int = 500,
                 shuffle: bool = True, seed: Optional[int] = None):
        """
        Args:
            repeat_factors: r_I(α) for the training list the loader indexes.
            total_batch_size: images per iteration over all ranks (SOLVER.IMS_PER_BATCH).
            max_iter: T_max of α_d = T / T_max.
            period: iterations between recomputes of the factors.
            shuffle: permute each pass (False keeps dataset order, for debugging).
            seed: shared by all ranks and workers; None draws one shared random seed.
        """
        if period <= 0:
            raise ValueError(f"DATALOADER.DRB.PERIOD must be > 0, got {period}")
        if total_batch_size <= 0:
            raise ValueError(f"total_batch_size must be > 0, got {total_batch_size}")
        alpha_at(0, max_iter)  # validates max_iter
        self.repeat_factors = repeat_factors
        self._total_batch_size = int(total_batch_size)
        self._max_iter = int(max_iter)
        self._period = int(period)
        self._shuffle = shuffle
        if seed is None:
            seed = comm.shared_random_seed()
        self._seed = int(seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self._cached_factors: tuple[int, torch.Tensor] | None = None

    # ---- the schedule ---------------------------------------------------------------------
    def period_of(self, iteration: int) -> int:
        return int(iteration) // self._period

    def alpha_of_period(self, period_index: int) -> float:
        return alpha_at(period_index * self._period, self._max_iter)

    def factors_of_period(self, period_index: int) -> torch.Tensor:
        """r_I used during period k. (N,) float32; the last period's result is cached."""
        if self._cached_factors is None or self._cached_factors[0] != period_index:
            self._cached_factors = (period_index, self.repeat_factors(self.alpha_of_period(period_index)))
        return self._cached_factors[1]

    def state_at(self, iteration: int) -> RebalanceState:
        """The α_d, mean r_I and epoch length in use at a trainer iteration."""
        k = self.period_of(iteration)
        factors = self.factors_of_period(k)
        return RebalanceState(
            period_index=k,
            alpha=self.alpha_of_period(k),
            mean_repeat=float(factors.mean()),
            epoch_length=float(factors.sum()),
        )

    # ---- the index stream -----------------------------------------------------------------
    def _one_pass(self, factors: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One RFS epoch: stochastic rounding of r_I, each index repeated, then shuffled. (~Σr_I,)"""
        int_part = torch.trunc(factors)
        rounded = int_part + (torch.rand(len(factors), generator=g) < factors - int_part).to(factors.dtype)
        indices = torch.repeat_interleave(torch.arange(len(factors)), rounded.to(torch.int64))
        if self._shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices

    def period_indices(self, period_index: int) -> torch.Tensor:
        """The global stream of one period: period × total_batch_size dataset indices."""
        needed = self._period * self._total_batch_size
        factors = self.factors_of_period(period_index)
        # Distinct, reproducible streams per period; the constant spreads neighbouring periods.
        g = torch.Generator().manual_seed((self._seed * 0x9E3779B1 + period_index) % (2**63 - 1))
        chunks = [self._one_pass(factors, g)]
        while sum(map(len, chunks)) < needed:
            chunks.append(self._one_pass(factors, g))
        return torch.cat(chunks)[:needed]

    def _global_indices(self) -> Iterator[int]:
        start = self._start_position()
        k, offset = divmod(start, self._period * self._total_batch_size)
        for period_index in itertools.count(k):
            yield from self.period_indices(period_index)[offset:].tolist()
            offset = 0

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._global_indices(), self._rank, None, self._world_size)
