"""A peer's rollout collection against the environment's own speed, and where a peer's wall time goes.

1. Raw speed: a gymnasium SyncVectorEnv (8 envs) stepping random actions, in one process and in two processes
   pinned to two cores: the physical limit of rollout collection here.
2. Collection: a hivegym Collector with the run's default policy (sampling actions, values and log-probs
   included), one torch thread, the same 8 envs.
3. A 2-peer swarm solving CartPole-v1: each peer's wall time split into collecting, computing gradients,
   local optimizer steps, averaging rounds (matchmaking and all-reduce) and the rest (reports, snapshots).
Writes benchmarks/results/env_speed.json.

    python benchmarks/env_speed.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from benchmarks_common import machine, print_table, run_swarm

RESULTS = Path(__file__).with_name("results")


def raw_steps_per_s(env_id: str, num_envs: int, seconds: float, core: int | None = None) -> float:
    """Env steps per second of a SyncVectorEnv stepping random actions (autoreset included)."""
    import gymnasium as gym

    if core is not None:
        os.sched_setaffinity(0, {core})
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
    envs.reset(seed=0)
    envs.action_space.seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            envs.step(envs.action_space.sample())
        steps += 100 * num_envs
    rate = steps / (time.perf_counter() - start)
    envs.close()
    return rate


def collect_steps_per_s(env_id: str, seconds: float) -> float:
    """Env steps per second of hivegym's Collector with the default policy, one torch thread."""
    import torch

    from hivegym.protocol.config import RunConfig
    from hivegym.protocol.policy import build_policy
    from hivegym.protocol.rollout import Collector

    torch.set_num_threads(1)
    config = RunConfig()
    policy = build_policy(env_id, config.hidden_width, config.hidden_layers, config.seed)
    collector = Collector(env_id, config.num_envs, seed=0)
    generator = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        collector.collect(policy, config.rollout_steps, config.gamma, generator)
        steps += config.rollout_steps * config.num_envs
    rate = steps / (time.perf_counter() - start)
    collector.close()
    return rate


def in_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def two_pinned(env_id: str, seconds: float) -> float:
    cores = sorted(os.sched_getaffinity(0))[:2]
    with multiprocessing.get_context("spawn").Pool(len(cores)) as pool:
        rates = pool.starmap(raw_steps_per_s, [(env_id, 8, seconds, core) for core in cores])
    return sum(rates)


def breakdown(run: dict) -> list[dict]:
    """Shares of each peer's reported wall time."""
    rows = []
    for name, t in sorted(run["peers"].items()):
        wall = t.get("wall_s") or 0.0
        if wall <= 0:
            continue
        parts = {"collect": t["collect_s"], "compute": t["compute_s"], "local steps": t["step_s"] - t["average_s"],
                 "averaging": t["average_s"]}
        parts["other"] = max(wall - sum(parts.values()), 0.0)
        rows.append({"peer": name, "wall_s": round(wall, 1),
                     **{f"{k} %": round(100 * v / wall, 1) for k, v in parts.items()},
                     "averaging+other %": round(100 * (parts["averaging"] + parts["other"]) / wall, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s per speed measurement")
    parser.add_argument("--smoke", action="store_true", help="1 s per measurement, a swarm to return 30")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--out", type=Path, default=RESULTS / "env_speed.json")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else (5.0 if args.quick else 20.0)

    raw_one = in_process(raw_steps_per_s, args.env, 8, seconds)
    raw_two = two_pinned(args.env, seconds)
    collect = in_process(collect_steps_per_s, args.env, seconds)
    speed = [
        {"measure": "raw env, random actions, 1 process", "env_steps_per_s": round(raw_one), "share_of_raw": 1.0},
        {"measure": "raw env, random actions, 2 pinned processes", "env_steps_per_s": round(raw_two),
         "share_of_raw": round(raw_two / raw_one, 2)},
        {"measure": "hivegym Collector, default policy, 1 process", "env_steps_per_s": round(collect),
         "share_of_raw": round(collect / raw_one, 2)},
    ]
    print_table(speed)
    print(f"  target: collection >= 70% of raw: {'met' if collect / raw_one >= 0.7 else 'MISSED'} "
          f"({100 * collect / raw_one:.0f}%)")

    run = run_swarm(2, [f"env_id={args.env}"], 30.0 if args.smoke else 475.0, 1.5 if args.smoke else 5.0)
    shares = breakdown(run)
    print_table(shares)
    worst = max((row["averaging+other %"] for row in shares), default=None)
    print(f"  target: averaging and waiting <= 15% of a peer's wall time: "
          f"{'-' if worst is None else ('met' if worst <= 15 else 'MISSED')} (worst peer {worst}%)", file=sys.stdout)
    table = speed + [{"measure": f"2-peer swarm, {row['peer']}", **row} for row in shares]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "env_speed", "env": args.env, "seconds_per_measure": seconds,
                                    "machine": machine(), "table": table, "swarm_run": run}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
