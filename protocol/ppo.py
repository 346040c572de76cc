"""PPO's math as pure functions (CleanRL's ppo.py): GAE, minibatches, the clipped loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hivegym.protocol.policy import ActorCritic
from hivegym.protocol.rollout import Rollout


@dataclass
class Batch:
    obs: torch.Tensor  # [B, obs_dim]
    actions: torch.Tensor  # [B] or [B, act_dim]
    logprobs: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    returns: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.obs.shape[0]

    def to(self, device: torch.device) -> Batch:
        return Batch(*(x.to(device) for x in (self.obs, self.actions, self.logprobs, self.advantages, self.returns)))

    def take(self, idx: torch.Tensor) -> Batch:
        return Batch(self.obs[idx], self.actions[idx], self.logprobs[idx], self.advantages[idx], self.returns[idx])


def gae(rollout: Rollout, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation; returns (advantages [T, N], returns [T, N])."""
    steps = rollout.rewards.shape[0]
    advantages = torch.zeros_like(rollout.rewards)
    last = torch.zeros_like(rollout.last_value)
    for t in reversed(range(steps)):
        next_value = rollout.last_value if t == steps - 1 else rollout.values[t + 1]
        not_done = 1.0 - rollout.dones[t]
        delta = rollout.rewards[t] + gamma * next_value * not_done - rollout.values[t]
        last = delta + gamma * lam * not_done * last
        advantages[t] = last
    return advantages, advantages + rollout.values


def flatten(rollout: Rollout, gamma: float, lam: float) -> Batch:
    """Rollout [T, N, ...] to a flat Batch [T*N, ...] with GAE advantages."""
    advantages, returns = gae(rollout, gamma, lam)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    return Batch(flat(rollout.obs), flat(rollout.actions), flat(rollout.logprobs), flat(advantages), flat(returns))


def minibatches(batch: Batch, size: int, generator: torch.Generator) -> list[Batch]:
    """One shuffled pass over the batch in minibatches of `size` (the last one may be smaller)."""
    order = torch.randperm(len(batch), generator=generator).to(batch.obs.device)
    return [batch.take(order[i : i + size]) for i in range(0, len(batch), size)]


def ppo_loss(policy: ActorCritic, mb: Batch, clip_coef: float, ent_coef: float, vf_coef: float) -> torch.Tensor:
    """Clipped surrogate + value loss - entropy bonus, on one minibatch; a scalar."""
    dist = policy.dist(mb.obs)
    new_logprob = policy.log_prob(dist, mb.actions)  # [B]
    ratio = (new_logprob - mb.logprobs).exp()  # [B]
    adv = mb.advantages
    if len(adv) > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_loss = 0.5 * (policy.value(mb.obs) - mb.returns).pow(2).mean()
    entropy = policy.entropy(dist).mean()
    return pg_loss + vf_coef * v_loss - ent_coef * entropy
