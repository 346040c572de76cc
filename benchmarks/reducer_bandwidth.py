"""What the trusted reducers cost in bandwidth per volunteer, with the coordinator alone and with extra reducers.

The coordinator, an extra trusted reducer (`hivegym-launch --reducer-for`) and each volunteer run on hosts of their
own (network namespaces on one bridge, links not capped). Each swarm trains CartPole-v1 with the default settings
for a fixed time; the bytes each host sends and receives on its link are read between the first and the last
epoch the coordinator records (tensors, DHT and gRPC traffic included; start-up and shutdown left out), per global
step. The coordinator's bytes per step divided by the number of volunteers is its cost per volunteer: it grows
with the volunteers while it reduces alone, and an extra reducer takes a share of it. Root only: skipped with a
message otherwise. Writes benchmarks/results/reducer_bandwidth.json.

    python benchmarks/reducer_bandwidth.py            # 1, 2 and 3 volunteers x 0 and 1 extra reducers, 90 s each
    python benchmarks/reducer_bandwidth.py --quick    # 1 and 2 volunteers, 60 s each
    python benchmarks/reducer_bandwidth.py --smoke    # 1 volunteer, 0 and 1 extra reducers, 45 s each
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bandwidth import join_string, link_bytes, start, stop
from benchmarks_common import machine, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402  (the namespaces the end-to-end tests use)

RESULTS = Path(__file__).with_name("results")
COORDINATOR, REDUCER = 0, 1  # host numbers; volunteers are hosts 2, 3, ...


def counters(lab: netns.Lab, hosts: int) -> list[int]:
    """Bytes sent plus received so far on each host's link."""
    return [link_bytes(lab, h, "tx") + link_bytes(lab, h, "rx") for h in range(hosts)]


def run_once(lab: netns.Lab, volunteers: int, extra_reducers: int, seconds: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-reducers-{volunteers}v{extra_reducers}r-"))
    hosts = 2 + volunteers
    address = lab.addresses[COORDINATOR]
    coordinator = start(lab, COORDINATOR, [
        "hivegym.coordinator.cli", "--host", address, "--port", "50051", "--host-maddrs", f"/ip4/{address}/tcp/31337",
        "--run-dir", str(run_dir), "--max-minutes", str(seconds / 60 + 1), "--no-dashboard", "--log-level", "WARNING",
        "--set", "distill_sizes="], run_dir / "coordinator.log")
    others = []
    marks: list[tuple[int, list[int]]] = []
    try:
        join = join_string(run_dir, coordinator)
        if extra_reducers:
            reducer_address = lab.addresses[REDUCER]
            others.append(start(lab, REDUCER, [
                "hivegym.coordinator.cli", "--reducer-for", join, "--identity", str(run_dir / "coordinator.key"),
                "--host-maddrs", f"/ip4/{reducer_address}/tcp/31338"], run_dir / "reducer.log"))
        others += [start(lab, h, ["hivegym.peer.cli", "--coordinator", join, "--name", f"peer-{h}",
                                  "--identity", str(run_dir / f"peer-{h}.key")], run_dir / f"peer-{h}.log")
                   for h in range(2, hosts)]
        metrics = run_dir / "metrics.jsonl"
        end = None
        while coordinator.poll() is None and (end is None or time.monotonic() < end):
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            epoch = json.loads(lines[-1])["epoch"] if lines else 0
            if epoch >= 1 and (not marks or epoch > marks[-1][0]):
                mark = (epoch, counters(lab, hosts))
                marks = [marks[0], mark] if marks else [mark]
                end = end or time.monotonic() + seconds
            time.sleep(0.25)
    finally:
        for process in (*others, coordinator):
            stop(process)
    row = {"volunteers": volunteers, "extra_reducers": extra_reducers, "epochs": None,
           "coordinator_kB_per_step": None, "coordinator_kB_per_step_per_volunteer": None,
           "extra_reducer_kB_per_step": None, "volunteer_kB_per_step": None}
    if len(marks) >= 2:
        (epoch_a, bytes_a), (epoch_b, bytes_b) = marks[0], marks[-1]
        steps = epoch_b - epoch_a
        per_step = [(b - a) / steps / 1000 for a, b in zip(bytes_a, bytes_b)]
        row.update(epochs=steps, coordinator_kB_per_step=round(per_step[COORDINATOR], 1),
                   coordinator_kB_per_step_per_volunteer=round(per_step[COORDINATOR] / volunteers, 1),
                   extra_reducer_kB_per_step=round(per_step[REDUCER], 1) if extra_reducers else None,
                   volunteer_kB_per_step=round(sum(per_step[2:]) / volunteers, 1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "reducer_bandwidth.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reason = netns.unavailable()
    if reason:
        print(f"reducer_bandwidth benchmark skipped: {reason}")
        args.out.write_text(json.dumps({"benchmark": "reducer_bandwidth", "skipped": reason, "machine": machine(),
                                        "table": [{"skipped": reason}]}, indent=2))
        return
    counts, seconds = ([1], 45.0) if args.smoke else ([1, 2], 60.0) if args.quick else ([1, 2, 3], 90.0)
    rows = []
    with netns.Lab(2 + max(counts), subnet="10.79.0") as lab:
        for volunteers in counts:
            for extra in (0, 1):
                started = time.monotonic()
                rows.append(run_once(lab, volunteers, extra, seconds))
                print(f"  {volunteers} volunteer(s), {extra} extra reducer(s): {rows[-1]} "
                      f"({time.monotonic() - started:.0f}s)", file=sys.stderr)
    for row in rows:  # the coordinator's share with an extra reducer, against reducing alone
        alone = [r for r in rows if r["volunteers"] == row["volunteers"] and r["extra_reducers"] == 0]
        row["coordinator_vs_alone"] = (round(row["coordinator_kB_per_step"] / alone[0]["coordinator_kB_per_step"], 2)
                                       if row["coordinator_kB_per_step"] and alone[0]["coordinator_kB_per_step"]
                                       else None)
    print_table(rows)
    args.out.write_text(json.dumps({"benchmark": "reducer_bandwidth", "seconds_per_swarm": seconds,
                                    "machine": machine(), "table": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
