"""When the coordinator distils, and where: one distillation at a time in a spawned process at a lower
priority (the trusted peer must keep stepping), publishing signed packages from this process, so the
private key never leaves it."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from hivegym.distill.package import distill_run_policy, publish_best, summary
from hivegym.protocol.config import RunConfig, parse_sizes
from hivegym.protocol.identity import Identity

logger = logging.getLogger(__name__)

NICENESS = 10  # added to the distillation worker's nice value
Snapshot = dict[str, torch.Tensor]


def share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def lower_priority() -> None:
    """Initializer of the distillation worker."""
    os.nice(NICENESS)
    torch.set_num_threads(1)


def distill_job(config_json: str, state: Snapshot, epoch: int) -> list:
    return distill_run_policy(RunConfig.from_json(config_json), state, epoch)


class Distiller:
    """Distils when the evaluation return beats the last distilled one by distill_margin, every
    distill_every epochs, and once more at the end of a run that reached its target."""

    def __init__(self, config: RunConfig, directory: Path, identity: Identity):
        self.config, self.directory, self.identity = config, directory, identity
        self.enabled = bool(parse_sizes(config.distill_sizes))
        self.pool: ProcessPoolExecutor | None = None
        self.job: Future | None = None
        self.job_epoch = -1
        self.queued: tuple[int, Snapshot] | None = None  # the newest request waits while a job runs
        self.last_return = -math.inf  # evaluation return of the last distillation requested
        self.last_epoch = 0
        self.evaluated: tuple[int, Snapshot] | None = None  # the last evaluated snapshot

    def on_evaluation(self, epoch: int, mean_return: float, snapshot: Snapshot) -> None:
        self.evaluated = (epoch, snapshot)
        if mean_return >= self.last_return + self.config.distill_margin:
            self.last_return = mean_return
            self.request(epoch, snapshot, f"evaluation return {mean_return:.1f}")

    def poll(self, epoch: int, snapshot: Callable[[], Snapshot]) -> None:
        """After every trusted step: publish a finished job, start the queued one, distil every N epochs."""
        every = self.config.distill_every
        if every and epoch >= self.last_epoch + every:
            self.request(epoch, snapshot(), f"{every} epochs since the last")
        self.advance()

    def advance(self) -> None:
        if self.job is not None and self.job.done():
            self.collect()
        if self.job is None and self.queued is not None:
            (epoch, state), self.queued = self.queued, None
            self.pool = self.pool or ProcessPoolExecutor(1, multiprocessing.get_context("spawn"),
                                                         initializer=lower_priority)
            self.job, self.job_epoch = self.pool.submit(distill_job, self.config.to_json(), state, epoch), epoch

    def request(self, epoch: int, snapshot: Snapshot, why: str) -> None:
        if not self.enabled:
            return
        self.last_epoch, self.queued = epoch, (epoch, snapshot)
        logger.info("distillation of epoch %d requested (%s)", epoch, why)

    def collect(self) -> None:
        try:
            packages = self.job.result()
        except Exception as e:  # a failed distillation must not stop the run; the next one may succeed
            logger.warning("distillation of epoch %d failed: %s", self.job_epoch, e)
        else:
            names = publish_best(self.directory, self.identity, packages)
            logger.info("distillation of epoch %d done; published %s", self.job_epoch,
                        ", ".join(names) or "nothing better than before")
        self.job = None

    def finish(self) -> None:
        """At the end of a run that reached its target: distil the last evaluated policy and wait for it."""
        if not self.enabled or self.evaluated is None:
            return
        epoch, state = self.evaluated
        if self.job_epoch != epoch and (self.queued is None or self.queued[0] != epoch):
            self.request(epoch, state, "end of the run")
        logger.info("distilling the final policy (epoch %d) into %s", epoch, self.config.distill_sizes)
        while self.job is not None or self.queued is not None:
            if self.job is not None:
                self.job.exception()  # waits
            self.advance()
        packages = summary(self.directory)
        logger.info("distilled checkpoints in %s: %s", self.directory, "; ".join(
            f"{name} ({p['params']} params, {100 * p['param_share']:.1f}% of the teacher's; return "
            f"{p['mean_return']:.1f}, {share(p['return_share'])} of the teacher's)" for name, p in packages.items())
            or "none")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
