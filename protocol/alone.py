"""The swarm's batches in one plain process: every batch is its own epoch, and its contribution (protocol/work.py) is
applied as soon as it is computed. The baseline the swarm is measured against, and how teachers are trained."""

from __future__ import annotations

import time
from typing import Callable

import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic, build_policy
from hivegym.protocol.rollout import Collector, evaluate
from hivegym.protocol.work import batch_seeds, collect_batch, contribution, flat_params, set_flat_params_


def train_alone(config: RunConfig, target_return: float, max_env_steps: int, log: Callable[[dict], None] | None = None,
                policy: ActorCritic | None = None) -> dict:
    """Train `policy` (on the CPU; default: the run's initial policy) until the evaluation, every `eval_every`
    batches, reaches target_return or max_env_steps pass. `log` gets {wall_s, env_steps, eval_return, policy} after
    each evaluation. Returns {reached, wall_s, env_steps, eval_return, collect_s, compute_s}."""
    policy = policy or build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    collector = Collector(config.env_id, config.num_envs, 0)
    start = time.perf_counter()
    env_steps = batches = 0
    collect_s = compute_s = 0.0
    eval_return = None
    while env_steps < max_env_steps:
        seeds = batch_seeds(config.run_id, b"alone", batches, 0)
        t0 = time.perf_counter()
        _, batch = collect_batch(policy, config, collector, seeds)
        t1 = time.perf_counter()
        update = contribution(policy, batch, config, seeds.shuffle)  # [P]
        collect_s, compute_s = collect_s + t1 - t0, compute_s + time.perf_counter() - t1
        with torch.no_grad():
            set_flat_params_(policy, flat_params(policy) + update)
        env_steps, batches = env_steps + len(batch), batches + 1
        if batches % config.eval_every == 0:
            returns = evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)
            eval_return = sum(returns) / len(returns)
            if log:
                log({"wall_s": time.perf_counter() - start, "env_steps": env_steps, "eval_return": eval_return,
                     "policy": policy})
            if eval_return >= target_return:
                break
    collector.close()
    reached = eval_return is not None and eval_return >= target_return
    return {"reached": reached, "wall_s": time.perf_counter() - start, "env_steps": env_steps,
            "eval_return": eval_return, "collect_s": collect_s, "compute_s": compute_s}
