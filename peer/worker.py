"""The peer's training loop: collect a rollout, then PPO passes whose steps go to an optimizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic
from hivegym.protocol.ppo import flatten, minibatches, ppo_loss
from hivegym.protocol.rollout import Collector, derive_seed

StepFn = Callable[[int], None]  # applies the gradients in .grad; the argument is the minibatch's sample count


@dataclass
class Timings:
    """Seconds spent per phase of the loop (collect, compute gradients, optimizer step incl. averaging)."""

    collect: float = 0.0
    compute: float = 0.0
    step: float = 0.0
    average: float = 0.0  # part of `step`: the steps that ended an epoch (matchmaking and all-reduce)

    def as_dict(self) -> dict[str, float]:
        return {"collect_s": self.collect, "compute_s": self.compute, "step_s": self.step, "average_s": self.average}


@dataclass
class Progress:
    env_steps: int = 0
    samples: int = 0  # samples contributed to optimizer steps (one per sample per PPO pass)
    rollouts: int = 0
    recent_returns: list[float] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    def mean_return(self, last: int = 20) -> float | None:
        tail = self.recent_returns[-last:]
        return sum(tail) / len(tail) if tail else None


def ppo_update(policy: ActorCritic, config: RunConfig, batch, step: StepFn, generator: torch.Generator,
               timings: Timings, minibatch_size: int) -> int:
    """config.update_epochs shuffled passes; one step() per minibatch. Returns samples stepped."""
    params = list(policy.parameters())
    stepped = 0
    for _ in range(config.update_epochs):
        for mb in minibatches(batch, minibatch_size, generator):
            t0 = time.perf_counter()
            for p in params:
                p.grad = None
            loss = ppo_loss(policy, mb, config.clip_coef, config.ent_coef, config.vf_coef)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            t1 = time.perf_counter()
            step(len(mb))
            timings.compute += t1 - t0
            timings.step += time.perf_counter() - t1
            stepped += len(mb)
    return stepped


def train_rollout(policy: ActorCritic, config: RunConfig, collector: Collector, step: StepFn, progress: Progress,
                  seed_parts: tuple, minibatch_size: int | None = None, actor: ActorCritic | None = None) -> None:
    """One rollout and its PPO update. Sampling and shuffling seeds derive from seed_parts + rollout index.
    `actor` is a CPU copy of `policy` for collection when the policy learns on an accelerator."""
    generator = torch.Generator().manual_seed(derive_seed(*seed_parts, progress.rollouts))
    t0 = time.perf_counter()
    if actor is not None:
        actor.load_state_dict(policy.state_dict())
    rollout = collector.collect(actor or policy, config.rollout_steps, config.gamma, generator)
    progress.timings.collect += time.perf_counter() - t0
    device = next(policy.parameters()).device
    batch = flatten(rollout, config.gamma, config.gae_lambda).to(device)
    progress.samples += ppo_update(policy, config, batch, step, generator, progress.timings,
                                   minibatch_size or config.minibatch_size)
    progress.env_steps += len(batch)
    progress.rollouts += 1
    progress.recent_returns = (progress.recent_returns + rollout.episode_returns)[-100:]


def train_alone(config: RunConfig, target_return: float, max_env_steps: int, log: Callable[[dict], None] | None = None
                ) -> dict:
    """The same PPO in one plain process (torch Adam, no swarm): the baseline the swarm is measured against."""
    from hivegym.protocol.policy import build_policy
    from hivegym.protocol.rollout import evaluate

    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    adam = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    collector = Collector(config.env_id, config.num_envs, derive_seed(config.run_id, "alone", config.seed))
    progress, start = Progress(), time.perf_counter()
    eval_return, evals = None, 0
    samples_per_epoch = config.target_batch_size
    while progress.env_steps < max_env_steps:
        train_rollout(policy, config, collector, lambda n: adam.step(), progress, (config.run_id, "alone"))
        if progress.samples // samples_per_epoch // config.eval_every > evals:
            evals += 1
            returns = evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)
            eval_return = sum(returns) / len(returns)
            if log:
                log({"wall_s": time.perf_counter() - start, "env_steps": progress.env_steps,
                     "eval_return": eval_return})
            if eval_return >= target_return:
                break
    collector.close()
    wall = time.perf_counter() - start
    reached = eval_return is not None and eval_return >= target_return
    return {"reached": reached, "wall_s": wall, "env_steps": progress.env_steps, "eval_return": eval_return,
            **progress.timings.as_dict()}
