"""Learning per env step of synchronous rounds, without the network: N peers simulated in one process with the swarm's
own functions (protocol/work.py). Each round, every peer collects one seeded batch with the round's parameters and
computes its contribution; the round's result is their sample-weighted mean, which is what a real round computes
when every input lies within CenteredClip's radius. The deterministic evaluation runs after every round.

It isolates what the rule of a round costs in env steps (how much each peer collects, how many Adam steps its update
takes) from timing, stragglers and the rest that a real swarm adds; benchmarks/vs_sb3.py measures real swarms.

    python benchmarks/learning.py                 # CartPole-v1, 1/2/4 peers, both batch rules, 4 seeds
    python benchmarks/learning.py --quick         # 1/2 peers, 2 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_common import machine, print_table  # noqa: E402

RESULTS = Path(__file__).with_name("results")
# one process's batch: 8 envs x 128 steps, minibatch 256 (40 Adam steps per batch); a peer of an N-peer round gets
# 'whole': that batch each (the round's batch grows with N), or 'split': 1/N of its envs and of its minibatch, so its
# update takes as many Adam steps as one process's and the round's batch stays one process's
ONE_PROCESS = dict(num_envs=8, rollout_steps=128, minibatch_size=256)


def peer_config(base, peers: int, rule: str):
    if rule == "whole" or peers == 1:
        return dataclasses.replace(base, **ONE_PROCESS)
    return dataclasses.replace(base, num_envs=ONE_PROCESS["num_envs"] // peers, rollout_steps=128,
                               minibatch_size=ONE_PROCESS["minibatch_size"] // peers)


def env_steps_to_solve(config, peers: int, target: float, max_env_steps: int) -> dict:
    from hivegym.protocol.policy import build_policy
    from hivegym.protocol.rollout import Collector, evaluate
    from hivegym.protocol.work import batch_seeds, collect_batch, contribution, flat_params, set_flat_params_

    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    collector = Collector(config.env_id, config.num_envs, 0)
    env_steps = rounds = 0
    mean = None
    started = time.perf_counter()
    while env_steps < max_env_steps:
        start = flat_params(policy)  # [P]
        updates, weights = [], []
        for peer in range(peers):
            seeds = batch_seeds(config.run_id, f"peer-{peer}".encode(), rounds, 0)
            _, batch = collect_batch(policy, config, collector, seeds)
            updates.append(contribution(policy, batch, config, seeds.shuffle))  # [P]
            weights.append(float(len(batch)))
            env_steps += len(batch)
        total = sum(weights)
        set_flat_params_(policy, start + sum(w / total * u for w, u in zip(weights, updates)))
        rounds += 1
        returns = evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)
        mean = sum(returns) / len(returns)
        if mean >= target:
            break
    collector.close()
    return {"reached": mean is not None and mean >= target, "env_steps": env_steps, "rounds": rounds,
            "eval_return": mean, "wall_s": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--peers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="1 and 2 peers, 2 seeds")
    parser.add_argument("--smoke", action="store_true", help="target return 30, 1 seed, 1 and 2 peers")
    parser.add_argument("--max-env-steps", type=int, default=150_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    args = parser.parse_args()
    from hivegym.protocol.config import RunConfig

    torch.set_num_threads(1)
    seeds = 1 if args.smoke else (2 if args.quick else args.seeds)
    peer_counts = [1, 2] if (args.quick or args.smoke) else args.peers
    target = 30.0 if args.smoke else 475.0
    table, runs = [], {}
    single = None
    for peers in peer_counts:
        for rule in (["whole"] if peers == 1 else ["whole", "split"]):
            name = "one process" if peers == 1 else f"{peers} peers, {rule} batches"
            rows = []
            for seed in range(seeds):
                config = peer_config(RunConfig(seed=seed), peers, rule)
                rows.append({"seed": seed, **env_steps_to_solve(config, peers, target, args.max_env_steps)})
                print(f"  {name} seed {seed}: {rows[-1]}", file=sys.stderr)
            solved = [r["env_steps"] for r in rows if r["reached"]]
            median = statistics.median(solved) if len(solved) == len(rows) else None
            single = median if peers == 1 else single
            config = peer_config(RunConfig(), peers, rule)
            table.append({"system": name, "solved": f"{len(solved)}/{seeds}", "median_env_steps": median,
                          "vs_one_process": round(median / single, 2) if median and single else None,
                          "peer_batch": config.rollout_size, "adam_steps_per_update":
                              config.update_epochs * -(-config.rollout_size // config.minibatch_size)})
            runs[name] = rows
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "learning", "seeds": seeds, "target": target,
                                    "machine": machine(), "table": table, "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
