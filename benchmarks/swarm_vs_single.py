"""Swarm against a single process on CartPole-v1, side by side in one run, as ratios.

Systems: (a) the same PPO in one plain process (torch Adam, no hivemind); (b) a 1-peer swarm; (c) a 2-peer
swarm; (b) and (c) in both sync modes. Seeds alternate the order of the systems. Prints a table and writes
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_common import machine

RESULTS = Path(__file__).with_name("results")
# Per-mode settings found best in short tries on this machine: gradient averaging needs small epochs
# (one global step per 1024 samples) to get enough optimizer steps; local updates average every 65536 (the default).
MODE_SETTINGS = {"local": [], "grad": ["target_batch_size=1024"]}


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

    from hivegym.peer.worker import train_alone
    from hivegym.protocol.config import RunConfig

    torch.set_num_threads(1)
    result = train_alone(dataclasses.replace(RunConfig(), seed=seed), target, max_env_steps)
    return {**result, "train_wall_s": result["wall_s"], "bytes_per_peer_step": None}


def run_swarm(peers: int, mode: str, seed: int, target: float, max_minutes: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-{peers}-"))
    overrides = [f"sync_mode={mode}", f"seed={seed}", *MODE_SETTINGS[mode]]
    command = [sys.executable, "-m", "hivegym.coordinator.cli", "--local-peers", str(peers), "--target-return",
               str(target), "--max-minutes", str(max_minutes), "--run-dir", str(run_dir), "--log-level", "WARNING"]
    for item in overrides:
        command += ["--set", item]
    tx_before = loopback_tx_bytes()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=max_minutes * 60 + 120)
    tx = loopback_tx_bytes() - tx_before
    summary = json.loads((run_dir / "summary.json").read_text())
    train_wall = summary["wall_s"] - (summary["first_report_s"] or 0.0)  # from the first finished rollout
    hivemind_peers = peers + 1  # the coordinator's trusted peer takes part in every round
    return {"reached": summary["reached"], "wall_s": summary["wall_s"], "train_wall_s": round(train_wall, 2),
            "env_steps": summary["env_steps"], "eval_return": summary["eval_return"], "epochs": summary["epoch"],
            "bytes_per_peer_step": round(tx / hivemind_peers / max(summary["epoch"], 1))}


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


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

    systems = [("a: single process", None, 0), *((f"b: 1-peer swarm, {m}", m, 1) for m in MODE_SETTINGS),
               *((f"c: 2-peer swarm, {m}", m, 2) for m in MODE_SETTINGS)]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in systems}
    for seed in range(seeds):
        order = systems[seed % len(systems):] + systems[:seed % len(systems)]  # alternate who goes first
        for name, mode, peers in order:
            started = time.monotonic()
            if mode is None:
                row = run_single(seed, target, max_env_steps=300_000)
            else:
                row = run_swarm(peers, mode, seed, target, max_minutes)
            row["seed"] = seed
            runs[name].append(row)
            print(f"  seed {seed} {name}: reached={row['reached']} train_wall={row['train_wall_s']:.1f}s "
                  f"env_steps={row['env_steps']} ({time.monotonic() - started:.0f}s)", file=sys.stderr)

    base = median(runs["a: single process"], "train_wall_s")
    table = []
    for name, mode, peers in systems:
        rows = runs[name]
        wall = median(rows, "train_wall_s")
        steps = median(rows, "env_steps")
        table.append({
            "system": name, "solved": f"{sum(r['reached'] for r in rows)}/{len(rows)}",
            "median_train_wall_s": wall, "median_total_wall_s": median(rows, "wall_s"), "median_env_steps": steps,
            "env_steps_per_s": round(steps / wall) if wall and steps else None,
            "wall_ratio_vs_a": round(wall / base, 2) if wall and base else None,
            "bytes_per_peer_step": median(rows, "bytes_per_peer_step"),
        })
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "swarm_vs_single", "target_return": target, "seeds": seeds,
                                    "machine": machine(), "mode_settings": MODE_SETTINGS, "table": table,
                                    "runs": runs}, indent=2))
    print(f"wrote {args.out}")


def print_table(table: list[dict]) -> None:
    columns = list(table[0])
    widths = [max(len(c), *(len(fmt(r[c])) for r in table)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(fmt(row[c]).ljust(w) for c, w in zip(columns, widths)))


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
