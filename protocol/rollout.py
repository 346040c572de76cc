"""Seeded rollout collection with gymnasium vector envs, and deterministic evaluation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from hivegym.protocol.policy import ActorCritic


def derive_seed(*parts: object) -> int:
    """A public 63-bit seed from any parts (run id, peer key, epoch, batch index): anyone can recompute it."""
    digest = hashlib.sha256(b"\x1f".join(str(p).encode() for p in parts)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_envs(env_id: str, num_envs: int, seed: int) -> gym.vector.SyncVectorEnv:
    """SyncVectorEnv (AsyncVectorEnv is 3-8x slower for cheap envs on 2 cores) resetting in the same step."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    envs.reset(seed=seed)
    envs.action_space.seed(seed)
    return envs


@dataclass
class Rollout:
    obs: torch.Tensor  # [T, N, obs_dim]
    actions: torch.Tensor  # [T, N] discrete or [T, N, act_dim] Box
    logprobs: torch.Tensor  # [T, N]
    values: torch.Tensor  # [T, N]
    rewards: torch.Tensor  # [T, N], truncated steps already bootstrapped with gamma * V(final obs)
    dones: torch.Tensor  # [T, N], 1.0 where the episode ended at this step
    last_value: torch.Tensor  # [N], V(obs after the last step)
    episode_returns: list[float]  # returns of episodes that ended during this rollout
    env_returns: list[list[float]]  # the same per env: [N][episodes that ended in env i]

    def action_digests(self) -> list[bytes]:
        """Per env, the first 16 bytes of the sha256 of its action sequence: [N] (a replay must match them)."""
        per_env = self.actions.transpose(0, 1).contiguous().numpy()  # [N, T] or [N, T, act_dim]
        return [hashlib.sha256(row.tobytes()).digest()[:16] for row in per_env]


class Collector:
    """Keeps a vector env running across rollouts (episodes span rollout boundaries, as in PPO)."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        self.envs = make_envs(env_id, num_envs, seed)
        self.obs, _ = self.envs.reset(seed=seed)
        space = self.envs.single_action_space
        self.low, self.high = (space.low, space.high) if isinstance(space, gym.spaces.Box) else (None, None)

    @torch.no_grad()
    def collect(self, policy: ActorCritic, steps: int, gamma: float, generator: torch.Generator,
                seed: int | None = None) -> Rollout:
        """`steps` steps of every env. With `seed` the envs are reset first (env i from seed + i), which makes the
        rollout a pure function of (policy, seed, generator) on the CPU: anyone can replay it."""
        n = self.envs.num_envs
        if seed is not None:
            self.obs, _ = self.envs.reset(seed=seed)
        obs = torch.empty(steps + 1, n, *self.obs.shape[1:])  # [T+1, N, obs_dim]: the last row is for last_value
        act_buf, rewards, dones = [], torch.zeros(steps, n), torch.zeros(steps, n)
        env_returns: list[list[float]] = [[] for _ in range(n)]
        for t in range(steps):
            obs[t] = torch.from_numpy(np.asarray(self.obs, dtype=np.float32))
            # only the actor runs per step; values and log-probabilities are computed for the whole rollout at once
            out = policy.actor(obs[t])  # [N, act_dim]
            if policy.discrete:
                action = torch.multinomial(out.softmax(-1), 1, generator=generator).squeeze(-1)  # [N]
            else:
                noise = torch.randn(out.shape, generator=generator)
                action = out + policy.log_std.exp() * noise  # [N, act_dim]
            env_action = action.numpy() if self.low is None else np.clip(action.numpy(), self.low, self.high)
            next_obs, reward, terminated, truncated, info = self.envs.step(env_action)
            rewards[t] = torch.from_numpy(np.asarray(reward, dtype=np.float32))
            if truncated.any():  # bootstrap time-limit truncations from the final observation
                final = np.stack([info["final_obs"][i] if truncated[i] else self.obs[i] for i in range(n)])
                final_value = policy.value(torch.as_tensor(final, dtype=torch.float32))
                rewards[t] += gamma * final_value * torch.as_tensor(truncated & ~terminated, dtype=torch.float32)
            if "episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    env_returns[i].append(float(info["episode"]["r"][i]))
            act_buf.append(action)
            dones[t] = torch.from_numpy(terminated | truncated)
            self.obs = next_obs
        obs[steps] = torch.from_numpy(np.asarray(self.obs, dtype=np.float32))
        actions = torch.stack(act_buf)  # [T, N] or [T, N, act_dim]
        values = policy.value(obs.flatten(0, 1)).view(steps + 1, n)  # [T+1, N]
        dist = policy.dist(obs[:steps].flatten(0, 1))
        logprobs = policy.log_prob(dist, actions.flatten(0, 1)).view(steps, n)  # [T, N]
        return Rollout(obs[:steps], actions, logprobs, values[:steps], rewards, dones, values[steps],
                       [r for env in env_returns for r in env], env_returns)

    def close(self) -> None:
        self.envs.close()


@torch.no_grad()
def evaluate(policy: ActorCritic, env_id: str, episodes: int, seed: int) -> list[float]:
    """Deterministic (greedy / mean) actions; episode i starts from reset(seed=seed + i)."""
    env = gym.make(env_id)
    space = env.action_space
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            action = policy.act_deterministic(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            if isinstance(space, gym.spaces.Box):
                action = np.clip(action, space.low, space.high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns
