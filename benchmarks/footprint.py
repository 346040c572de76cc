"""Memory and start-up: peak memory of a peer and of the coordinator, and the time from `hivegym-join` to the
peer's first contributed gradient, on 127.0.0.1 with the default config (CartPole-v1, CPU).

Memory is sampled every 0.2 s while a 1-peer swarm trains to the target: the main process's RSS, and the PSS
summed over its whole process tree (hivemind's DHT, averagers and p2pd included; PSS splits shared pages
between processes, so the sum counts torch's libraries once). Writes benchmarks/results/footprint.json.

    python benchmarks/footprint.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_common import machine, print_table
from hivegym.protocol.shutdown import descendants

RESULTS = Path(__file__).with_name("results")
MIB = 1024 * 1024


def kib_field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(pid: int) -> tuple[int, int]:
    """(RSS of the process, PSS summed over it and its descendants), in bytes."""
    tree = [pid, *descendants(pid)]
    return kib_field(f"/proc/{pid}/status", "VmRSS"), sum(kib_field(f"/proc/{p}/smaps_rollup", "Pss") for p in tree)


def run_once(target: float, max_minutes: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "hivegym.coordinator.cli", "--run-dir", str(run_dir), "--target-return", str(target),
         "--max-minutes", str(max_minutes), "--no-dashboard", "--set", "distill_sizes="],
        stdout=subprocess.DEVNULL, stderr=open(run_dir / "coordinator.log", "wb"), stdin=subprocess.DEVNULL)
    info = run_dir / "coordinator.json"
    while not info.exists() and coordinator.poll() is None:
        time.sleep(0.1)
    peer_log = run_dir / "peer.log"
    started = time.monotonic()
    peer = subprocess.Popen([sys.executable, "-m", "hivegym.peer.cli", "--coordinator",
                             json.loads(info.read_text())["join"], "--name", "footprint",
                             "--identity", str(run_dir / "footprint.key")],
                            stdout=subprocess.DEVNULL, stderr=open(peer_log, "wb"), stdin=subprocess.DEVNULL)
    first = None
    peaks = {"peer_rss": 0, "peer_tree_pss": 0, "coordinator_rss": 0, "coordinator_tree_pss": 0}
    while coordinator.poll() is None:
        if first is None and b"contributed a first gradient" in peer_log.read_bytes():
            first = time.monotonic() - started
        for role, pid in (("peer", peer.pid), ("coordinator", coordinator.pid)):
            rss, pss = memory(pid)
            peaks[f"{role}_rss"] = max(peaks[f"{role}_rss"], rss)
            peaks[f"{role}_tree_pss"] = max(peaks[f"{role}_tree_pss"], pss)
        time.sleep(0.2)
    peer.terminate()
    peer.wait(timeout=30)
    return {"join_to_first_gradient_s": None if first is None else round(first, 2),
            **{k: round(v / MIB) for k, v in peaks.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run instead of 3")
    parser.add_argument("--smoke", action="store_true", help="1 short run (target return 30)")
    parser.add_argument("--out", type=Path, default=RESULTS / "footprint.json")
    args = parser.parse_args()
    runs = [run_once(30.0 if args.smoke else 475.0, 1.5 if args.smoke else 4.0)
            for _ in range(1 if (args.quick or args.smoke) else 3)]
    joins = [r["join_to_first_gradient_s"] for r in runs if r["join_to_first_gradient_s"] is not None]
    join = statistics.median(joins) if joins else None
    peer_mib = max(r["peer_tree_pss"] for r in runs)
    table = [
        {"measure": "peer: peak RSS of the main process (MiB)", "value": max(r["peer_rss"] for r in runs)},
        {"measure": "peer: peak PSS of all its processes (MiB)", "value": peer_mib,
         "target": "<= 600", "verdict": "met" if peer_mib <= 600 else "MISSED"},
        {"measure": "coordinator: peak RSS of the main process (MiB)",
         "value": max(r["coordinator_rss"] for r in runs)},
        {"measure": "coordinator: peak PSS of all its processes (MiB)",
         "value": max(r["coordinator_tree_pss"] for r in runs)},
        {"measure": "hivegym-join to first contributed gradient (s, median)", "value": join, "target": "<= 10",
         "verdict": "-" if join is None else ("met" if join <= 10 else "MISSED")},
    ]
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "footprint", "seeds": len(runs), "machine": machine(),
                                    "table": table, "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
