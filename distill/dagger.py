"""DAgger-style distillation of a teacher actor into smaller students.

Each iteration rolls a mix of teacher and student (the teacher acts with probability beta, which falls
from 1 to 0 over the first `mix_iterations`), labels every visited state with the teacher's action
distribution, adds the states to the aggregated data set and trains the student on it, minimising
KL(teacher || student). Early stopping and the choice of the best iterate use validation episodes;
teacher and student are then compared on the separate, seeded evaluation episodes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from hivegym.distill.actor import Actor, width_for
from hivegym.protocol.policy import parameter_count
from hivegym.protocol.rollout import evaluate, make_envs

logger = logging.getLogger(__name__)


def kl_categorical(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per state for logits [B, A] -> [B]."""
    t_logp = teacher_logits.log_softmax(-1)
    return (t_logp.exp() * (t_logp - student_logits.log_softmax(-1))).sum(-1)


def kl_gaussian(t_mean: torch.Tensor, t_log_std: torch.Tensor, s_mean: torch.Tensor,
                s_log_std: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of diagonal Gaussians, means [B, D], log stds [D] or [B, D] -> [B]."""
    var_ratio = (2 * (t_log_std - s_log_std)).exp()
    mean_term = (t_mean - s_mean).pow(2) / (2 * (2 * s_log_std).exp())
    return (s_log_std - t_log_std + var_ratio / 2 + mean_term - 0.5).sum(-1)


def distill_loss(teacher: Actor, student: Actor, obs: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Mean KL over a batch; teacher_out [B, A] are the teacher's logits or means for obs [B, obs_dim]."""
    student_out = student(obs)
    if student.discrete:
        return kl_categorical(teacher_out, student_out).mean()
    return kl_gaussian(teacher_out, teacher.log_std, student_out, student.log_std).mean()


@dataclass(frozen=True)
class Settings:
    iterations: int = 30
    """Most DAgger iterations."""
    num_envs: int = 8
    steps_per_iteration: int = 128
    """Steps per env per iteration: num_envs * steps_per_iteration states are labelled each iteration."""
    mix_iterations: int = 3
    """The teacher's share of the actions falls linearly from 1 to 0 over this many iterations."""
    updates_per_iteration: int = 200
    batch_size: int = 256
    learning_rate: float = 3e-3
    max_states: int = 200_000
    """The aggregated data set keeps this many most recent states."""
    validation_episodes: int = 10
    eval_episodes: int = 20
    eval_seed: int = 1_000_000
    """Evaluation episode i uses eval_seed + i; validation episodes use eval_seed + 100_000 + i."""
    seed: int = 0


@dataclass
class Result:
    name: str
    student: Actor
    returns: list[float]  # the student's, on the evaluation episodes
    iterations: int
    wall_s: float
    history: list[dict] = field(default_factory=list)  # per validated iteration: iteration, return

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))


@torch.no_grad()
def collect(teacher: Actor, student: Actor, envs: gym.vector.VectorEnv, obs: np.ndarray, steps: int, beta: float,
            generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Roll the teacher/student mix; returns the visited states [steps * N, obs_dim] and the last obs."""
    space = envs.single_action_space
    states = []
    for _ in range(steps):
        x = torch.as_tensor(obs, dtype=torch.float32)  # [N, obs_dim]
        use_teacher = torch.rand(len(x), generator=generator) < beta  # [N]
        t_dist, s_dist = teacher.dist(x), student.dist(x)
        if teacher.discrete:
            t_act = torch.multinomial(t_dist.probs, 1, generator=generator).squeeze(-1)
            s_act = torch.multinomial(s_dist.probs, 1, generator=generator).squeeze(-1)
            action = torch.where(use_teacher, t_act, s_act).numpy()
        else:
            noise = torch.randn(t_dist.mean.shape, generator=generator)
            mean = torch.where(use_teacher[:, None], t_dist.mean, s_dist.mean)
            std = torch.where(use_teacher[:, None], t_dist.stddev, s_dist.stddev)
            action = np.clip((mean + std * noise).numpy(), space.low, space.high)
        states.append(x)
        obs, *_ = envs.step(action)
    return torch.cat(states), obs


def mean_return(actor: Actor, env_id: str, episodes: int, seed: int) -> float:
    return float(np.mean(evaluate(actor, env_id, episodes, seed)))


def distill_one(teacher: Actor, env_id: str, name: str, width: int, settings: Settings,
                target: float) -> Result:
    """Train one student of `width` until its validation return reaches `target` (the teacher's validation
    return) or the iterations run out; returns the best validated iterate, evaluated on the eval episodes."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        student = Actor(teacher.obs_dim, teacher.act_dim, teacher.discrete, [width] * len(teacher.hidden))
    adam = torch.optim.Adam(student.parameters(), lr=settings.learning_rate)
    envs = make_envs(env_id, settings.num_envs, settings.seed)
    obs, _ = envs.reset(seed=settings.seed)
    states = torch.empty(0, teacher.obs_dim)
    best_state, best_return, history = None, -math.inf, []
    validation_seed = settings.eval_seed + 100_000
    for it in range(settings.iterations):
        beta = max(0.0, 1.0 - it / settings.mix_iterations)
        new, obs = collect(teacher, student, envs, obs, settings.steps_per_iteration, beta, generator)
        states = torch.cat([states, new])[-settings.max_states:]  # [S, obs_dim]
        with torch.no_grad():
            labels = teacher(states)  # [S, act_dim]; relabelled in full: cheap next to the rollouts
        for _ in range(settings.updates_per_iteration):
            idx = torch.randint(len(states), (min(settings.batch_size, len(states)),), generator=generator)
            loss = distill_loss(teacher, student, states[idx], labels[idx])
            adam.zero_grad()
            loss.backward()
            adam.step()
        if beta > 0:
            continue  # the student has not yet steered its own data; judge it once it has
        score = mean_return(student, env_id, settings.validation_episodes, validation_seed)
        history.append({"iteration": it + 1, "validation_return": score, "loss": loss.item()})
        logger.debug("%s iteration %d: validation return %.1f (target %.1f)", name, it + 1, score, target)
        if score > best_return:
            best_return, best_state = score, {k: v.clone() for k, v in student.state_dict().items()}
        if score >= target:
            break
    envs.close()
    if best_state is not None:
        student.load_state_dict(best_state)
    returns = evaluate(student, env_id, settings.eval_episodes, settings.eval_seed)
    return Result(name, student, returns, it + 1, time.perf_counter() - start, history)


class RandomActor:
    """Uniform random actions from a seeded action space: the baseline of the return share."""

    def __init__(self, env_id: str, seed: int):
        env = gym.make(env_id)
        self.space = env.action_space
        env.close()
        self.space.seed(seed)

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.space.sample())


@dataclass
class Distillation:
    teacher_returns: list[float]  # on the evaluation episodes, like every Result's returns
    random_returns: list[float]
    results: list[Result]

    def share(self, returns: list[float]) -> float | None:
        """(mean - random) / (teacher - random): 1.0 matches the teacher, 0.0 is no better than random actions.
        Unlike mean / teacher, it stays meaningful where returns are negative (Acrobot, Pendulum)."""
        teacher, random = np.mean(self.teacher_returns), np.mean(self.random_returns)
        return float((np.mean(returns) - random) / (teacher - random)) if teacher != random else None


def distill(teacher: Actor, env_id: str, sizes: dict[str, float], settings: Settings = Settings()) -> Distillation:
    """Distil `teacher` into one student per size (name -> fraction of the teacher's parameters),
    comparing them on the same seeded evaluation episodes."""
    teacher_returns = evaluate(teacher, env_id, settings.eval_episodes, settings.eval_seed)
    random_returns = evaluate(RandomActor(env_id, settings.seed), env_id, settings.eval_episodes, settings.eval_seed)
    target = mean_return(teacher, env_id, settings.validation_episodes, settings.eval_seed + 100_000)
    results = []
    for name, fraction in sizes.items():
        width = width_for(fraction, teacher)
        result = distill_one(teacher, env_id, name, width, settings, target)
        logger.info("student %s: width %d, %d parameters (%.1f%% of the teacher's), return %.1f vs the teacher's "
                    "%.1f, %d iterations, %.1fs", name, width, parameter_count(result.student),
                    100 * parameter_count(result.student) / parameter_count(teacher), result.mean,
                    np.mean(teacher_returns), result.iterations, result.wall_s)
        results.append(result)
    return Distillation(teacher_returns, random_returns, results)
