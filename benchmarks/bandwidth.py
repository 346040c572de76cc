"""Separate hosts with limited bandwidth: the coordinator and two peers in three network namespaces.

Each host's link to the bridge is capped with `tc tbf` on its egress (so every byte a host sends crosses a
capped link); the swarm solves CartPole-v1 for each bandwidth and compression. Measured: wall time to
an evaluation return of 475 (from the first finished rollout) and bytes each host sends per global step (the
veth's tx counter between the first and the last epoch: tensors, DHT and gRPC traffic included; start-up and
shutdown left out, and given whole in peer_bytes_in_all). Root only: skipped with a message otherwise.
Writes benchmarks/results/bandwidth.json.

    python benchmarks/bandwidth.py            # unlimited, 100, 20, 5 Mbit/s x every codec
    python benchmarks/bandwidth.py --quick    # unlimited and 5 Mbit/s, no compression and uint8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_common import machine, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402  (the namespaces the end-to-end tests use)

RESULTS = Path(__file__).with_name("results")
CODECS = ["none", "float16", "uint8"]
LIMITS_MBIT = [None, 100, 20, 5]


def link_bytes(lab: netns.Lab, host: int, direction: str = "tx") -> int:
    """Bytes a host has sent ("tx") or received ("rx") on its link."""
    out = subprocess.run([*lab.prefix(host), "cat", f"/sys/class/net/eth0/statistics/{direction}_bytes"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return int(out)


def cap(lab: netns.Lab, mbit: int | None) -> None:
    for host in range(len(lab.names)):
        subprocess.run([*lab.prefix(host), "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True,
                       timeout=10)
        if mbit is not None:
            burst_kbit = max(32, mbit * 10)  # 10 ms at the line rate
            subprocess.run([*lab.prefix(host), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                            f"{mbit}mbit", "burst", f"{burst_kbit}kbit", "latency", "400ms"],
                           check=True, capture_output=True, timeout=10)


def start(lab: netns.Lab, host: int, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*lab.prefix(host), sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), stdin=subprocess.DEVNULL, start_new_session=True)


def join_string(run_dir: Path, coordinator: subprocess.Popen, timeout: float = 90.0) -> str:
    """The join string the coordinator writes to run_dir/coordinator.json once it serves."""
    info = run_dir / "coordinator.json"
    deadline = time.monotonic() + timeout
    while not info.exists() and coordinator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return json.loads(info.read_text())["join"]


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_once(lab: netns.Lab, codec: str, seed: int, max_minutes: float, target: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-bw-{codec}-"))
    coordinator_address = lab.addresses[0]
    overrides = [f"compression={codec}", f"seed={seed}", "distill_sizes="]
    command = ["hivegym.coordinator.cli", "--host", coordinator_address, "--port", "50051", "--host-maddrs",
               f"/ip4/{coordinator_address}/tcp/31337", "--run-dir", str(run_dir), "--target-return", str(target),
               "--max-minutes", str(max_minutes), "--no-dashboard", "--log-level", "WARNING"]
    for item in overrides:
        command += ["--set", item]
    before = [link_bytes(lab, h) for h in range(3)]
    coordinator = start(lab, 0, command, run_dir / "coordinator.log")
    peers: list[subprocess.Popen] = []
    try:
        join = join_string(run_dir, coordinator)
        peers = [start(lab, h, ["hivegym.peer.cli", "--coordinator", join, "--name", f"peer-{h}",
                                    "--identity", str(run_dir / f"peer-{h}.key")],
                     run_dir / f"peer-{h}.log") for h in (1, 2)]
        marks = steady_marks(lab, coordinator, run_dir / "metrics.jsonl", max_minutes * 60 + 120)
    finally:
        for process in (*peers, coordinator):
            stop(process)
    sent = [link_bytes(lab, h) - b for h, b in zip(range(3), before)]
    summary = json.loads((run_dir / "summary.json").read_text())
    first = summary["first_report_s"] or 0.0
    row = {"reached": summary["reached"], "train_wall_s": round(summary["wall_s"] - first, 2),
           "env_steps": summary["env_steps"], "epochs": summary["epoch"],
           "peer_bytes_per_step": None, "coordinator_bytes_per_step": None,
           "peer_bytes_in_all": round(statistics.mean(sent[1:])), "run_dir": str(run_dir)}
    if len(marks) >= 2:  # between the first and the last epoch seen: start-up and shutdown left out
        (epoch_a, tx_a), (epoch_b, tx_b) = marks[0], marks[-1]
        steps = epoch_b - epoch_a
        row["peer_bytes_per_step"] = round(statistics.mean([tx_b[h] - tx_a[h] for h in (1, 2)]) / steps)
        row["coordinator_bytes_per_step"] = round((tx_b[0] - tx_a[0]) / steps)
    return row


def steady_marks(lab: netns.Lab, coordinator: subprocess.Popen, metrics: Path, timeout: float
                 ) -> list[tuple[int, list[int]]]:
    """Waits for the coordinator to exit; returns (epoch, tx bytes per host) when epoch 1 and the last epoch
    were first seen in metrics.jsonl."""
    marks: list[tuple[int, list[int]]] = []
    deadline = time.monotonic() + timeout
    while coordinator.poll() is None and time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        epoch = json.loads(lines[-1])["epoch"] if lines else 0
        if epoch >= 1 and (not marks or epoch > marks[-1][0]):
            mark = (epoch, [link_bytes(lab, h) for h in range(3)])
            marks = [marks[0], mark] if marks else [mark]
        time.sleep(0.25)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="target return 30, unlimited and 5 Mbit/s, float16")
    parser.add_argument("--max-minutes", type=float, default=4.0, help="limit per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "bandwidth.json")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        print(f"bandwidth benchmark skipped: {reason}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "bandwidth", "skipped": reason, "machine": machine(),
                                        "table": [{"skipped": reason}]}, indent=2))
        return
    codecs = ["float16"] if args.smoke else (["none", "uint8"] if args.quick else CODECS)
    limits = [None, 5] if (args.smoke or args.quick) else LIMITS_MBIT
    target, max_minutes = (30.0, 1.5) if args.smoke else (475.0, args.max_minutes)

    rows = []
    with netns.Lab(3, subnet="10.78.0") as lab:
        for mbit in limits:
            cap(lab, mbit)
            for codec in codecs:
                started = time.monotonic()
                row = {"link": "unlimited" if mbit is None else f"{mbit} Mbit/s", "compression": codec,
                       **run_once(lab, codec, 0, max_minutes, target)}
                rows.append(row)
                print(f"  {row['link']} {codec}: reached={row['reached']} train_wall={row['train_wall_s']}s "
                      f"{row['peer_bytes_per_step']} B/peer/step ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    for row in rows:  # ratios against the same setting unlimited, and against no compression on the same link
        same = [r for r in rows if r["link"] == "unlimited" and r["compression"] == row["compression"]]
        plain = [r for r in rows if (r["link"], r["compression"]) == (row["link"], "none")]
        row["wall_vs_unlimited"] = (round(row["train_wall_s"] / same[0]["train_wall_s"], 2)
                                    if same and row["reached"] and same[0]["reached"] else None)
        row["bytes_vs_uncompressed"] = (round(row["peer_bytes_per_step"] / plain[0]["peer_bytes_per_step"], 2)
                                        if row["peer_bytes_per_step"] and plain and plain[0]["peer_bytes_per_step"]
                                        else None)
        del row["run_dir"]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "bandwidth", "seeds": 1, "machine": machine(), "table": rows},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
