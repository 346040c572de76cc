"""The acting half of a policy, which is what a checkpoint ships: an MLP from observations to action
logits (discrete) or means (Box), plus a state-independent log std for Box actions."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

from hivegym.protocol.checkpoint import CheckpointError
from hivegym.protocol.policy import ActorCritic, mlp, parameter_count

MAX_DIM = 4096  # a manifest from elsewhere may not make us allocate more than this per layer


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: list[int]):
        super().__init__()
        self.obs_dim, self.act_dim, self.discrete, self.hidden = obs_dim, act_dim, discrete, list(hidden)
        self.net = mlp([obs_dim, *hidden, act_dim], out_gain=0.01)
        if not discrete:
            self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # [B, act_dim] logits or means

    def dist(self, obs: torch.Tensor) -> Distribution:
        out = self.net(obs)
        return Categorical(logits=out) if self.discrete else Normal(out, self.log_std.exp().expand_as(out))

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.net(obs)
        return out.argmax(-1) if self.discrete else out

    def architecture(self) -> dict[str, Any]:
        return {"kind": "mlp", "activation": "tanh", "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "discrete": self.discrete, "hidden": self.hidden}

    @classmethod
    def from_teacher(cls, teacher: ActorCritic) -> Actor:
        """The teacher's own actor (same weights), without its critic."""
        linears = [m for m in teacher.actor if isinstance(m, nn.Linear)]
        actor = cls(linears[0].in_features, linears[-1].out_features, teacher.discrete,
                    [m.out_features for m in linears[:-1]])
        actor.net.load_state_dict(teacher.actor.state_dict())
        if not teacher.discrete:
            actor.log_std.data.copy_(teacher.log_std.data)
        return actor

    @classmethod
    def from_architecture(cls, arch: dict[str, Any]) -> Actor:
        """Build from a manifest's architecture, refusing anything this code did not write."""
        ints = [arch.get("obs_dim"), arch.get("act_dim"), *(arch.get("hidden") or [None])]
        if (arch.get("kind"), arch.get("activation")) != ("mlp", "tanh") or type(arch.get("discrete")) is not bool \
                or not isinstance(arch.get("hidden"), list) or len(arch["hidden"]) > 8 \
                or not all(type(n) is int and 0 < n <= MAX_DIM for n in ints):
            raise CheckpointError(f"unsupported architecture in manifest: {str(arch)[:200]}")
        return cls(arch["obs_dim"], arch["act_dim"], arch["discrete"], arch["hidden"])


def actor_params(obs_dim: int, act_dim: int, discrete: bool, hidden: list[int]) -> int:
    sizes = [obs_dim, *hidden, act_dim]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:])) + (0 if discrete else act_dim)


def width_for(fraction: float, teacher: Actor) -> int:
    """The widest student with the teacher's depth and at most `fraction` of its parameters (at least 1)."""
    budget = fraction * parameter_count(teacher)
    width = 1
    while actor_params(teacher.obs_dim, teacher.act_dim, teacher.discrete, [width + 1] * len(teacher.hidden)) \
            <= budget:
        width += 1
    return width


def to_bytes(actor: Actor) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in actor.state_dict().items()}, buffer)
    return buffer.getvalue()


def load_weights(actor: Actor, data: bytes) -> Actor:
    """Load tensor-only weights (weights_only=True: nothing but tensors is unpickled); shapes must match."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        actor.load_state_dict(state)
    except Exception as e:  # torch raises several kinds for a bad file; any of them means "not usable"
        raise CheckpointError(f"weights do not load into the manifest's architecture: {str(e).splitlines()[0]}")
    return actor
