"""Checkpoint packages of a distillation: the manifest of each student and of the teacher, and publishing
them under the run directory, keeping the best package per size."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from hivegym.distill.actor import Actor, to_bytes
from hivegym.distill.dagger import Distillation, Settings, distill
from hivegym.protocol.checkpoint import CheckpointError, parse_manifest, publish
from hivegym.protocol.config import RunConfig, parse_sizes
from hivegym.protocol.identity import Identity
from hivegym.protocol.policy import build_policy, parameter_count
from hivegym.protocol.rollout import derive_seed

logger = logging.getLogger(__name__)


def describe_space(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    described = {"type": type(space).__name__, "shape": list(space.shape), "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Box) and np.isfinite(space.low).all() and np.isfinite(space.high).all():
        described.update(low=space.low.tolist(), high=space.high.tolist())
    return described


def package_name(env_id: str, size: str) -> str:
    return f"{env_id.replace('/', '-')}-{size}"


def manifests(env_id: str, teacher: Actor, epoch: int, run_id: str, distillation: Distillation,
              settings: Settings) -> list[tuple[dict[str, Any], bytes]]:
    """(unsigned manifest, weights) for the teacher and every student."""
    env = gym.make(env_id)
    spaces = {"observation_space": describe_space(env.observation_space),
              "action_space": describe_space(env.action_space)}
    env.close()
    teacher_mean = float(np.mean(distillation.teacher_returns))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"env_id": env_id, **spaces, "created": created,
              "teacher": {"epoch": epoch, "run_id": run_id, "params": parameter_count(teacher)}}

    def evaluation(returns: list[float]) -> dict[str, Any]:
        mean = float(np.mean(returns))
        return {"episodes": len(returns), "seed": settings.eval_seed, "mean_return": mean,
                "std_return": float(np.std(returns)), "teacher_mean_return": teacher_mean,
                "return_ratio": mean / teacher_mean if teacher_mean else None,
                "random_mean_return": float(np.mean(distillation.random_returns)),
                "return_share": distillation.share(returns)}

    out = [({**common, "name": package_name(env_id, "teacher"), "role": "teacher", "size": "teacher",
             "architecture": teacher.architecture(), "params": parameter_count(teacher), "param_share": 1.0,
             "evaluation": evaluation(distillation.teacher_returns)}, to_bytes(teacher))]
    for r in distillation.results:
        params = parameter_count(r.student)
        out.append(({**common, "name": package_name(env_id, r.name), "role": "student", "size": r.name,
                     "architecture": r.student.architecture(), "params": params,
                     "param_share": params / parameter_count(teacher), "evaluation": evaluation(r.returns),
                     "distillation": {"method": "dagger", "iterations": r.iterations, "wall_s": round(r.wall_s, 2)}},
                    to_bytes(r.student)))
    return out


def distill_run_policy(config: RunConfig, state: dict, epoch: int) -> list[tuple[dict[str, Any], bytes]]:
    """Distil the run's policy (an ActorCritic state dict at `epoch`) into config.distill_sizes; returns the
    unsigned packages of the teacher and its students."""
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    policy.load_state_dict(state)
    teacher = Actor.from_teacher(policy)
    settings = Settings(iterations=config.distill_iterations, eval_episodes=config.distill_episodes,
                        eval_seed=config.eval_seed, seed=derive_seed(config.run_id, "distill", epoch) % 2**31)
    distillation = distill(teacher, config.env_id, parse_sizes(config.distill_sizes), settings)
    return manifests(config.env_id, teacher, epoch, config.run_id, distillation, settings)


def current_return(directory: Path, name: str) -> float | None:
    """Mean return of the package of that name already published here, if any."""
    try:
        manifest = parse_manifest((directory / f"{name}.json").read_bytes())
        return float(manifest["evaluation"]["mean_return"])
    except (OSError, CheckpointError, KeyError, TypeError, ValueError):
        return None


def publish_best(directory: Path, identity: Identity, packages: list[tuple[dict[str, Any], bytes]]) -> list[str]:
    """Publish each package unless one of its name with a higher mean return is already there (ties go to
    the newer teacher). Returns the names published."""
    published = []
    for manifest, weights in packages:
        old = current_return(directory, manifest["name"])
        if old is not None and old > manifest["evaluation"]["mean_return"]:
            continue
        publish(directory, manifest, weights, identity)
        published.append(manifest["name"])
    return published


def summary(directory: Path) -> dict[str, dict[str, Any]]:
    """name -> params, param_share, mean_return, return_share of every package in the directory."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        try:
            m = parse_manifest(path.read_bytes())
        except (OSError, CheckpointError):
            continue
        share = m["evaluation"]["return_share"]
        out[m["name"]] = {"params": m["params"], "param_share": round(m.get("param_share", 1.0), 4),
                          "mean_return": m["evaluation"]["mean_return"],
                          "return_share": None if share is None else round(share, 4),
                          "teacher_epoch": m["teacher"]["epoch"]}
    return out
