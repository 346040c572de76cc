"""The coordinator's own hivemind peer: a full (non-client) peer that reduces every round and serves state.

It trains on a small, throttled stream of real samples: a peer with no samples publishes no progress, so
client volunteers would never learn the swarm's epoch, and step(batch_size=0) divides by zero in hivemind.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from hivegym.peer import swarm
from hivegym.peer.worker import Progress, train_rollout
from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import build_policy
from hivegym.protocol.rollout import Collector, derive_seed, evaluate

logger = logging.getLogger(__name__)

TRUSTED_NUM_ENVS = 1  # its rollouts are small: it is there to reduce, not to compute
TRUSTED_MINIBATCH = 8
TRUSTED_STEP_PAUSE_S = 0.02  # pause after each step; keeps it to a few percent of one core


class TrustedPeer:
    def __init__(self, config: RunConfig, host_maddrs: list[str] | None = None,
                 announce_maddrs: list[str] | None = None):
        self.config = config
        self.dht = swarm.start_dht([], client_mode=False, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs)
        self.policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
        self.opt = swarm.make_optimizer(self.dht, self.policy, config, client_mode=False)
        self.collector = Collector(config.env_id, TRUSTED_NUM_ENVS, derive_seed(config.run_id, "coordinator"))
        self.progress = Progress()
        self.started = time.monotonic()

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    def maddrs(self) -> list[str]:
        return swarm.visible_maddrs(self.dht)

    def train_once(self, after_step: Callable[[], bool]) -> bool:
        """One small rollout and its PPO passes; each optimizer step may join an averaging round.
        after_step() runs after every step; once it returns True the rollout ends and so does this (True)."""
        done = False

        def step(batch_size: int) -> None:
            nonlocal done
            if not done:
                self.opt.step(batch_size=batch_size)
                time.sleep(TRUSTED_STEP_PAUSE_S)
                done = after_step()

        train_rollout(self.policy, self.config, self.collector, step, self.progress,
                      (self.config.run_id, "coordinator"), TRUSTED_MINIBATCH)
        return done

    def samples_per_second(self) -> float:
        return self.progress.samples / max(time.monotonic() - self.started, 1e-9)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def shutdown(self) -> None:
        self.collector.close()
        swarm.shutdown(self.opt, self.dht)


def warm_up() -> None:
    """Runs first in the evaluation worker, so its imports are paid before the first evaluation is due."""
    torch.set_num_threads(1)
    import gymnasium  # noqa: F401


def evaluate_snapshot(config_json: str, state: dict[str, torch.Tensor]) -> list[float]:
    """Runs in the evaluation worker process: deterministic returns of a parameter snapshot."""
    torch.set_num_threads(1)
    config = RunConfig.from_json(config_json)
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    policy.load_state_dict(state)
    return evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)
