"""A teacher trained in one process, for tests and benchmarks: protocol/alone.py's train_alone, keeping the
best-evaluated policy (train_alone returns only figures)."""

from __future__ import annotations

import copy
import logging

from hivegym.protocol.alone import train_alone
from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic, build_policy

logger = logging.getLogger(__name__)


def train_teacher(config: RunConfig, target_return: float, max_env_steps: int) -> tuple[ActorCritic, dict]:
    """Train until the evaluation (every `eval_every` batches) reaches target_return or max_env_steps pass.
    Returns the best-evaluated policy and {env_steps, wall_s, eval_return}."""
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    best = {"return": float("-inf"), "policy": copy.deepcopy(policy)}

    def keep_best(row: dict) -> None:
        logger.debug("teacher at %d env steps: return %.1f", row["env_steps"], row["eval_return"])
        if row["eval_return"] > best["return"]:
            best.update({"return": row["eval_return"], "policy": copy.deepcopy(row["policy"])})

    result = train_alone(config, target_return, max_env_steps, keep_best, policy)
    return best["policy"], {"env_steps": result["env_steps"], "wall_s": result["wall_s"], "eval_return": best["return"]}
