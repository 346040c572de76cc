"""The peer's training loop, one batch at a time: collect a seeded batch with the epoch's parameters, compute its
contribution, hand it to the optimizer (one hivemind step per batch), and keep the epoch's state."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic
from hivegym.protocol.rollout import Collector
from hivegym.protocol.work import (BatchSeeds, Work, collect_batch, contribution, flat_params,
                                   params_hash, set_flat_params_, sketch, sketch_seed)

StepFn = Callable[[int], "int | None"]  # one optimizer step for this many samples; the new epoch if it began one


@dataclass
class Timings:
    """Seconds spent per phase of the loop (collect, compute contributions, optimizer steps incl. averaging)."""

    collect: float = 0.0
    compute: float = 0.0
    step: float = 0.0
    average: float = 0.0  # part of `step`: the steps that ended an epoch (matchmaking and all-reduce)


@dataclass
class Progress:
    env_steps: int = 0
    samples: int = 0  # samples handed to the optimizer (a batch counts once per PPO pass)
    batches: int = 0
    recent_returns: list[float] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    def mean_return(self, last: int = 20) -> float | None:
        tail = self.recent_returns[-last:]
        return sum(tail) / len(tail) if tail else None


class Epoch:
    """A peer's view of the current epoch: its parameters (the behaviour policy, on the CPU), their hash and
    sketch for receipts, the contributions made so far, and the next batch index."""

    def __init__(self, policy: ActorCritic, epoch: int, config: RunConfig, next_batch: int = 0):
        self.number, self.config = epoch, config
        self.behaviour = copy.deepcopy(policy).cpu()
        self.params = flat_params(policy)  # [P] on the policy's device
        self.total = torch.zeros_like(self.params)
        self.count = 0
        self.hash = params_hash(self.behaviour)
        self.sketch = sketch(self.params, config.sketch_dim, sketch_seed(config.run_id))
        self.next_batch = next_batch  # a peer that reloads into an epoch it worked in goes on with its numbering


@dataclass
class BatchResult:
    work: Work
    epoch: int
    batch: int
    collect_s: float
    compute_s: float
    step_s: float = 0.0
    average_s: float = 0.0


def round_input(epoch: Epoch) -> torch.Tensor:
    """What a peer puts into the next round: the epoch's parameters + its mean contribution, [P]."""
    return epoch.params + epoch.total / epoch.count


def do_batch(policy: ActorCritic, epoch: Epoch, collector: Collector, seeds: BatchSeeds, progress: Progress,
             step: StepFn) -> tuple[BatchResult, Epoch]:
    """One batch: collect with the epoch's parameters, compute the contribution, apply it and step the optimizer.
    Returns the batch's result and the epoch after the step (a new one if the step began it)."""
    config = epoch.config
    device = epoch.params.device
    t0 = time.perf_counter()
    rollout, batch = collect_batch(epoch.behaviour, config, collector, seeds)
    t1 = time.perf_counter()
    update = contribution(epoch.behaviour, batch, config, seeds.shuffle, device)
    t2 = time.perf_counter()
    result = BatchResult(Work(rollout, batch, update), epoch.number, epoch.next_batch, t1 - t0, t2 - t1)
    epoch.next_batch += 1
    with torch.no_grad():  # what goes into the round: the epoch's parameters + the mean contribution
        epoch.total += update.to(device)
        epoch.count += 1
        set_flat_params_(policy, round_input(epoch))
    samples = len(batch) * config.update_epochs
    new_epoch = step(samples)
    result.step_s = time.perf_counter() - t2
    if new_epoch is not None:
        result.average_s = result.step_s
        epoch = Epoch(policy, new_epoch, config)
    else:
        with torch.no_grad():  # between steps the peer holds the epoch's parameters (what a downloader gets)
            set_flat_params_(policy, epoch.params)
    progress.env_steps += len(batch)
    progress.samples += samples
    progress.batches += 1
    progress.recent_returns = (progress.recent_returns + rollout.episode_returns)[-100:]
    t = progress.timings
    t.collect, t.compute = t.collect + result.collect_s, t.compute + result.compute_s
    t.step, t.average = t.step + result.step_s, t.average + result.average_s
    return result, epoch
