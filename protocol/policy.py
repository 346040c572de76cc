"""Actor-critic MLP policies for discrete and Box action spaces."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else np.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, nn.Tanh()]
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (CleanRL's layout). Box actions use a state-independent log std."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, width: int, layers: int):
        super().__init__()
        hidden = [width] * layers
        self.discrete = discrete
        self.critic = mlp([obs_dim, *hidden, 1], out_gain=1.0)
        self.actor = mlp([obs_dim, *hidden, act_dim], out_gain=0.01)
        if not discrete:
            self.log_std = nn.Parameter(torch.zeros(act_dim))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # [B]

    def dist(self, obs: torch.Tensor) -> Distribution:
        out = self.actor(obs)  # [B, act_dim]
        if self.discrete:
            return Categorical(logits=out, validate_args=False)  # validation costs more than the MLP here
        return Normal(out, self.log_std.exp().expand_as(out), validate_args=False)

    def log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        lp = dist.log_prob(actions)
        return lp if self.discrete else lp.sum(-1)  # [B]

    def entropy(self, dist: Distribution) -> torch.Tensor:
        ent = dist.entropy()
        return ent if self.discrete else ent.sum(-1)  # [B]

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(obs)
        return out.argmax(-1) if self.discrete else out


def space_dims(env: gym.Env | gym.vector.VectorEnv) -> tuple[int, int, bool]:
    """(obs_dim, act_dim, discrete) of an env's single observation and action spaces."""
    obs_space = getattr(env, "single_observation_space", env.observation_space)
    act_space = getattr(env, "single_action_space", env.action_space)
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"only flat Box observations are supported, got {obs_space}")
    if isinstance(act_space, gym.spaces.Discrete):
        return obs_space.shape[0], int(act_space.n), True
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return obs_space.shape[0], act_space.shape[0], False
    raise ValueError(f"only Discrete and flat Box action spaces are supported, got {act_space}")


def build_policy(env_id: str, width: int, layers: int, seed: int) -> ActorCritic:
    """The run's policy with its initial weights, identical on every peer for the same seed."""
    env = gym.make(env_id)
    obs_dim, act_dim, discrete = space_dims(env)
    env.close()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ActorCritic(obs_dim, act_dim, discrete, width, layers)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
