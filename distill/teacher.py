"""A teacher trained in one process, for tests and benchmarks: the PPO of peer/worker.py (train_rollout)
with plain Adam, like train_alone, but keeping the best-evaluated policy (train_alone returns only figures)."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from hivegym.peer.worker import Progress, train_rollout
from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic, build_policy
from hivegym.protocol.rollout import Collector, derive_seed, evaluate

logger = logging.getLogger(__name__)


def train_teacher(config: RunConfig, target_return: float, max_env_steps: int) -> tuple[ActorCritic, dict]:
    """Train until the evaluation (every `eval_every` rollouts) reaches target_return or max_env_steps pass.
    Returns the best-evaluated policy and {env_steps, wall_s, eval_return}."""
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    adam = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    collector = Collector(config.env_id, config.num_envs, derive_seed(config.run_id, "teacher", config.seed))
    progress, start = Progress(), time.perf_counter()
    best, best_return = copy.deepcopy(policy), -np.inf
    while progress.env_steps < max_env_steps and best_return < target_return:
        train_rollout(policy, config, collector, lambda n: adam.step(), progress, (config.run_id, "teacher"))
        if progress.rollouts % config.eval_every == 0:
            score = float(np.mean(evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)))
            logger.debug("teacher at %d env steps: return %.1f", progress.env_steps, score)
            if score > best_return:
                best, best_return = copy.deepcopy(policy), score
    collector.close()
    return best, {"env_steps": progress.env_steps, "wall_s": time.perf_counter() - start, "eval_return": best_return}
