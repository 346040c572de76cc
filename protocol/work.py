"""One unit of verifiable work: a seeded batch, its contribution to the swarm, and the sketches that a receipt
carries. Everything here is a pure function of public inputs (run id, peer key, epoch, batch index, the epoch's
parameters and the config), so the coordinator can replay any batch and compare.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import ActorCritic
from hivegym.protocol.ppo import Batch, flatten, minibatches, ppo_loss
from hivegym.protocol.rollout import Collector, Rollout, derive_seed


@dataclass(frozen=True)
class BatchSeeds:
    envs: int  # env i of the batch resets from envs + i
    actions: int  # the action-sampling generator
    shuffle: int  # the PPO minibatch order


def batch_seeds(run_id: str, public_key: bytes, epoch: int, batch_index: int) -> BatchSeeds:
    """Public seeds of a batch: anyone who knows the peer's key can recompute them, and the peer cannot choose them."""
    parts = (run_id, public_key.hex(), epoch, batch_index)
    return BatchSeeds(derive_seed(*parts, "envs") % 2**31, derive_seed(*parts, "actions"),
                      derive_seed(*parts, "shuffle"))


@dataclass
class Work:
    rollout: Rollout
    batch: Batch
    update: torch.Tensor  # [P] flat: the batch's contribution (see contribution())


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])  # [P]


@torch.no_grad()
def set_flat_params_(module: torch.nn.Module, vector: torch.Tensor) -> None:
    """Copy a flat vector [P] into the parameters in place (hivemind's averagers share their storage)."""
    offset = 0
    for p in module.parameters():
        p.copy_(vector[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def params_hash(module: torch.nn.Module) -> str:
    """sha256 of the parameters as float32 bytes, in parameter order."""
    return hashlib.sha256(flat_params(module).float().cpu().numpy().tobytes()).hexdigest()


def collect_batch(policy: ActorCritic, config: RunConfig, collector: Collector, seeds: BatchSeeds
                  ) -> tuple[Rollout, Batch]:
    """The batch's rollout, collected with `policy` (on the CPU) from its seeds, and its GAE batch."""
    rollout = collector.collect(policy, config.rollout_steps, config.gamma,
                                torch.Generator().manual_seed(seeds.actions), seed=seeds.envs)
    return rollout, flatten(rollout, config.gamma, config.gae_lambda)


def replay_batch(policy: ActorCritic, config: RunConfig, collector: Collector, seeds: BatchSeeds) -> Work:
    """Collect the batch and compute its contribution: what an audit compares with a receipt."""
    rollout, batch = collect_batch(policy, config, collector, seeds)
    return Work(rollout, batch, contribution(policy, batch, config, seeds.shuffle))


def contribution(policy: ActorCritic, batch: Batch, config: RunConfig, shuffle_seed: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """What the batch adds to the swarm, as a flat vector [P]: the parameter change of `update_epochs` PPO passes
    over the batch starting from `policy` with a fresh Adam (so it depends on nothing but the epoch's parameters and
    the batch); `policy` is not changed."""
    learner = copy.deepcopy(policy).to(device or torch.device("cpu"))
    batch = batch.to(device or torch.device("cpu"))
    generator = torch.Generator().manual_seed(shuffle_seed)
    start = flat_params(learner)
    # eps 1e-5 (CleanRL's): with torch's 1e-8, coordinates whose gradient is ~0 take full-size steps in the
    # direction of noise, and a replay from parameters that differ by the codec's rounding drifts apart
    adam = torch.optim.Adam(learner.parameters(), lr=config.learning_rate, eps=1e-5)
    for _ in range(config.update_epochs):
        for mb in minibatches(batch, config.minibatch_size, generator):
            adam.zero_grad(set_to_none=True)
            _clipped_backward(learner, mb, config)
            adam.step()
    return (flat_params(learner) - start).cpu()


def _clipped_backward(policy: ActorCritic, mb: Batch, config: RunConfig) -> None:
    ppo_loss(policy, mb, config.clip_coef, config.ent_coef, config.vf_coef).backward()
    torch.nn.utils.clip_grad_norm_(list(policy.parameters()), config.max_grad_norm)


_PROJECTIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def sketch(vector: torch.Tensor, dim: int, seed: int) -> list[float]:
    """Projection of a flat vector [P] onto `dim` fixed random directions from a public seed: [dim].
    Linear, so the sketch of a sum is the sum of the sketches."""
    key = (vector.numel(), dim, seed)
    if key not in _PROJECTIONS:
        generator = torch.Generator().manual_seed(seed)
        _PROJECTIONS.clear()  # one run uses one shape; keep the memory of one matrix
        _PROJECTIONS[key] = torch.randn(dim, vector.numel(), generator=generator)  # float32: 128 MB at 1M x 32
    return (_PROJECTIONS[key] @ vector.float().cpu()).tolist()


def sketch_seed(run_id: str) -> int:
    return derive_seed(run_id, "sketch")
