"""Distilled students against their teacher on CartPole-v1, Acrobot-v1, LunarLander-v3 and Pendulum-v1.

Each teacher is trained in one process (distill/teacher.py: this project's PPO, plain Adam) with the env's
settings below, then distilled (DAgger) into students of 1%, 5% and 20% of its actor's parameters. Teacher
and students are compared on the same 100 seeded episodes. The teacher is wider than a run's default policy
(256 instead of 64 units per layer, `--teacher-width` to change): a 5% student of a 64-wide actor is 11
units wide, and at batch 1 the per-call overhead of torch hides any difference in compute. Writes
benchmarks/results/distill.json and distill.png (return share against parameter share).

    python benchmarks/distill.py            # teachers trained longer, 30 DAgger iterations
    python benchmarks/distill.py --quick    # a few minutes: short teacher training, 12 iterations
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks_common import machine, unavailable_env
from hivegym.distill.actor import Actor, width_for
from hivegym.distill.dagger import Settings, distill
from hivegym.distill.teacher import train_teacher
from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import parameter_count

RESULTS = Path(__file__).with_name("results")
# A half-trained LunarLander teacher's return has a std of ~120 per episode: over 20 episodes its mean moved
# from 20 to 84 between seed sets, more than any 5% margin, so the comparison uses 100 seeded episodes.
EPISODES = 100
SIZES = {"tiny": 0.01, "small": 0.05, "medium": 0.2}
# per env: RunConfig overrides, target return, env steps (full, quick)
ENVS = {
    "CartPole-v1": ({"learning_rate": 1e-3}, 475.0, (200_000, 100_000)),
    "Acrobot-v1": ({"learning_rate": 1e-3, "gamma": 0.99, "gae_lambda": 0.95}, -80.0, (300_000, 100_000)),
    "LunarLander-v3": ({"learning_rate": 3e-4, "gamma": 0.99, "gae_lambda": 0.95, "ent_coef": 0.01,
                        "rollout_steps": 128}, 200.0, (1_000_000, 200_000)),
    "Pendulum-v1": ({"learning_rate": 1e-3, "gamma": 0.95, "gae_lambda": 0.95, "rollout_steps": 128},
                    -200.0, (600_000, 200_000)),
}


@torch.inference_mode()
def latency_us(actor: Actor, repeats: int = 2000) -> float:
    """Median over 5 runs of the time per deterministic action for one observation (batch 1), in µs."""
    obs = torch.randn(1, actor.obs_dim)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            actor.act_deterministic(obs)
        runs.append((time.perf_counter() - start) / repeats * 1e6)
    return float(np.median(runs))


@torch.inference_mode()
def batch_us(actor: Actor, batch: int = 4096, repeats: int = 20) -> float:
    """Time per observation in a batch of 4096 (throughput rather than latency: compute, not call overhead)."""
    obs = torch.randn(batch, actor.obs_dim)
    start = time.perf_counter()
    for _ in range(repeats):
        actor.act_deterministic(obs)
    return (time.perf_counter() - start) / repeats / batch * 1e6


def bench_env(env_id: str, quick: bool, teacher_width: int) -> dict:
    overrides, target, budgets = ENVS[env_id]
    overrides = {**overrides, "hidden_width": teacher_width, "hidden_layers": 2}
    config = dataclasses.replace(RunConfig(), env_id=env_id, eval_every=10, **overrides)
    policy, trained = train_teacher(config, target, budgets[1] if quick else budgets[0])
    teacher = Actor.from_teacher(policy)
    settings = Settings(iterations=12 if quick else 30, eval_episodes=EPISODES, validation_episodes=30, seed=1)
    result = distill(teacher, env_id, SIZES, settings)
    teacher_latency, teacher_batch = latency_us(teacher), batch_us(teacher)
    teacher_mean = float(np.mean(result.teacher_returns))
    students = []
    for r in result.results:
        latency, per_sample = latency_us(r.student), batch_us(r.student)
        students.append({"size": r.name, "fraction": SIZES[r.name], "width": width_for(SIZES[r.name], teacher),
                         "params": parameter_count(r.student),
                         "param_share": parameter_count(r.student) / parameter_count(teacher),
                         "mean_return": r.mean, "stderr": float(np.std(r.returns) / np.sqrt(EPISODES)),
                         "return_share": result.share(r.returns),
                         "return_ratio": r.mean / teacher_mean if teacher_mean else None,
                         "latency_us": latency, "speedup": teacher_latency / latency,
                         "batch4096_us": per_sample, "batch_speedup": teacher_batch / per_sample,
                         "distill_wall_s": r.wall_s, "iterations": r.iterations})
    return {"env_id": env_id, "teacher": {
        "config": overrides, "full_config": json.loads(config.to_json()), "train_env_steps": trained["env_steps"],
        "train_wall_s": trained["wall_s"], "target_return": target, "params": parameter_count(teacher),
        "mean_return": teacher_mean, "stderr": float(np.std(result.teacher_returns) / np.sqrt(EPISODES)),
        "random_mean_return": float(np.mean(result.random_returns)),
        "latency_us": teacher_latency, "batch4096_us": teacher_batch}, "students": students}


def targets(rows: list[dict]) -> dict:
    """The issue's targets for the largest student at most 5% of the teacher's parameters."""
    out = {}
    for row in rows:
        if "students" not in row:
            out[row["env_id"]] = {"met": None, "why": row["error"]}
            continue
        small = max((s for s in row["students"] if s["param_share"] <= 0.05), key=lambda s: s["params"])
        met = small["return_share"] is not None and small["return_share"] >= 0.95 and small["speedup"] >= 5
        out[row["env_id"]] = {"size": small["size"], "return_share": small["return_share"],
                              "speedup": small["speedup"], "batch_speedup": small["batch_speedup"], "met": met}
    return out


def flat_table(rows: list[dict]) -> list[dict]:
    """One row per teacher and student, for benchmarks/RESULTS.md."""
    out = []
    for row in rows:
        if "students" not in row:
            out.append({"env": row["env_id"], "size": row["error"]})
            continue
        t = row["teacher"]
        out.append({"env": row["env_id"], "size": "teacher", "params": t["params"], "param_share": 1.0,
                    "mean_return": round(t["mean_return"], 1), "return_share": 1.0,
                    "latency_us": round(t["latency_us"], 1), "speedup": 1.0, "batch_speedup": 1.0,
                    "distill_wall_s": None})
        for s in row["students"]:
            share = s["return_share"]
            out.append({"env": row["env_id"], "size": s["size"], "params": s["params"],
                        "param_share": round(s["param_share"], 4), "mean_return": round(s["mean_return"], 1),
                        "return_share": None if share is None else round(share, 4),
                        "latency_us": round(s["latency_us"], 1), "speedup": round(s["speedup"], 2),
                        "batch_speedup": round(s["batch_speedup"], 2), "distill_wall_s": round(s["distill_wall_s"], 1)})
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'env':16} {'size':8} {'params':>7} {'of teacher':>10} {'return':>9} {'share':>7} {'latency µs':>11} "
          f"{'speedup':>8} {'batch sp.':>9} {'distil s':>9}")
    for row in rows:
        if "students" not in row:
            print(f"{row['env_id']:16} {row['error']}")
            continue
        t = row["teacher"]
        print(f"{row['env_id']:16} {'teacher':8} {t['params']:>7} {'100.0%':>10} {t['mean_return']:>9.1f} "
              f"{'100.0%':>7} {t['latency_us']:>11.1f} {'1.0x':>8} {'1.0x':>9} {'':>9}")
        for s in row["students"]:
            share = "-" if s["return_share"] is None else f"{100 * s['return_share']:.1f}%"
            print(f"{'':16} {s['size']:8} {s['params']:>7} {100 * s['param_share']:>9.1f}% {s['mean_return']:>9.1f} "
                  f"{share:>7} {s['latency_us']:>11.1f} {s['speedup']:>7.1f}x {s['batch_speedup']:>8.1f}x "
                  f"{s['distill_wall_s']:>9.1f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if "students" in row:
            xs = [100 * s["param_share"] for s in row["students"]] + [100.0]
            ys = [100 * (s["return_share"] or 0) for s in row["students"]] + [100.0]
            ax.plot(xs, ys, marker="o", label=row["env_id"])
    ax.axhline(95, color="grey", linestyle="--", linewidth=1)
    ax.axvline(5, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", xlabel="student parameters, % of the teacher's", ylabel="return share, % of the teacher's",
           title="Distilled students (return share: (student - random) / (teacher - random))")
    ax.title.set_fontsize(8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short teacher training and 12 DAgger iterations")
    parser.add_argument("--envs", nargs="*", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--teacher-width", type=int, default=256, help="units per hidden layer (2 layers)")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    rows = []
    for env_id in args.envs:
        error = unavailable_env(env_id)
        rows.append({"env_id": env_id, "error": error} if error else bench_env(env_id, args.quick, args.teacher_width))
    print_table(rows)
    result = {"benchmark": "distill", "quick": args.quick, "teacher_width": args.teacher_width, "episodes": EPISODES,
              "machine": machine(), "sizes": SIZES,
              "teacher_settings": "distill/teacher.py (PPO, Adam) with RunConfig defaults plus each env's config; "
                                  "eval every 10 rollouts, best-evaluated policy kept",
              "latency": "batch 1, torch.set_num_threads(1), torch.inference_mode, median of 5 x 2000 calls; "
                         "batch_speedup: time per observation in batches of 4096 (compute rather than overhead)",
              "targets": targets(rows), "table": flat_table(rows), "envs": rows}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
