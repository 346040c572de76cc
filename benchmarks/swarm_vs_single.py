"""Swarm against a single process on CartPole-v1, side by side in one run, as ratios.

Systems: (a) the same PPO in one plain process (torch Adam, no hivemind); (b) a 1-peer swarm; (c) a 2-peer
swarm. Seeds alternate the order of the systems. Prints a table and writes
benchmarks/results/swarm_vs_single.json.

    python benchmarks/swarm_vs_single.py            # 3 seeds, every system
    python benchmarks/swarm_vs_single.py --quick    # 1 seed
    python benchmarks/swarm_vs_single.py --smoke    # tiny target, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

from benchmarks_common import machine, print_table, run_swarm

RESULTS = Path(__file__).with_name("results")


def loopback_tx_bytes() -> int:
    try:
        return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())
    except OSError:
        return 0


def run_single(seed: int, target: float, max_env_steps: int) -> dict:
    """(a): train_alone in a fresh process (one torch thread), like each swarm peer gets."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_single_worker, (seed, target, max_env_steps))


def _single_worker(seed: int, target: float, max_env_steps: int) -> dict:
    import dataclasses

    import torch

    from hivegym.protocol.alone import train_alone
    from hivegym.protocol.config import RunConfig

    torch.set_num_threads(1)
    curve: list[list[float]] = []
    result = train_alone(dataclasses.replace(RunConfig(), seed=seed), target, max_env_steps,
                         log=lambda row: curve.append([round(row["wall_s"], 2), row["env_steps"], row["eval_return"]]))
    return {**result, "train_wall_s": result["wall_s"], "bytes_per_peer_step": None, "curve": curve}


def run_swarm_measured(peers: int, seed: int, target: float, max_minutes: float) -> dict:
    """(b) and (c), with the bytes this run sent over loopback (machine-wide: run nothing else meanwhile)."""
    tx_before = loopback_tx_bytes()
    result = run_swarm(peers, [f"seed={seed}"], target, max_minutes)
    hivemind_peers = peers + 1  # the coordinator's trusted peer takes part in every round
    result["bytes_per_peer_step"] = round((loopback_tx_bytes() - tx_before) / hivemind_peers / max(result["epochs"], 1))
    return result


def median(rows: list[dict], key: str, solved_only: bool = False) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and (r["reached"] or not solved_only)]
    return round(statistics.median(values), 2) if values else None


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per system: time and env steps to the target over the solved runs, throughput over all."""
    base = median(runs["a: single process"], "train_wall_s", solved_only=True)
    table = []
    for name, rows in runs.items():
        wall = median(rows, "train_wall_s", solved_only=True)
        for row in rows:
            row["env_steps_per_s"] = round(row["env_steps"] / row["train_wall_s"]) if row["train_wall_s"] else None
        table.append({
            "system": name, "solved": f"{sum(r['reached'] for r in rows)}/{len(rows)}",
            "median_train_wall_s": wall, "median_total_wall_s": median(rows, "wall_s", solved_only=True),
            "median_env_steps": median(rows, "env_steps", solved_only=True),
            "env_steps_per_s": median(rows, "env_steps_per_s"),
            "wall_ratio_vs_a": round(wall / base, 2) if wall and base else None,
            "bytes_per_peer_step": median(rows, "bytes_per_peer_step"),
        })
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--smoke", action="store_true", help="target return 30, 1 seed, short limits")
    parser.add_argument("--max-minutes", type=float, default=4.0, help="limit per swarm run")
    parser.add_argument("--out", type=Path, default=RESULTS / "swarm_vs_single.json")
    args = parser.parse_args()
    seeds = 1 if (args.quick or args.smoke) else args.seeds
    target = 30.0 if args.smoke else 475.0
    max_minutes = 1.5 if args.smoke else args.max_minutes

    systems = [("a: single process", 0), ("b: 1-peer swarm", 1), ("c: 2-peer swarm", 2)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in systems}
    curves: dict[str, list] = {}  # return against [train wall s, env steps, eval return] per run
    for seed in range(seeds):
        order = systems[seed % len(systems):] + systems[:seed % len(systems)]  # alternate who goes first
        for name, peers in order:
            started = time.monotonic()
            if peers == 0:
                row = run_single(seed, target, max_env_steps=300_000)
            else:
                row = run_swarm_measured(peers, seed, target, max_minutes)
            row["seed"] = seed
            runs[name].append(row)
            curves[f"{name} seed {seed}"] = row["curve"]
            print(f"  seed {seed} {name}: reached={row['reached']} train_wall={row['train_wall_s']:.1f}s "
                  f"env_steps={row['env_steps']} ({time.monotonic() - started:.0f}s)", file=sys.stderr)

    table = summarize(runs)
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "swarm_vs_single", "target_return": target, "seeds": seeds,
                                    "machine": machine(), "table": table,
                                    "curves": curves, "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
