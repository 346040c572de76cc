"""What verification costs: the coordinator's CPU seconds per audit against the peers' CPU seconds per batch, and an
all-honest swarm's time to solve with audits on and off.

1. In this process, with the default RunConfig (one torch thread, as peers and the audit worker use): a peer's
   batches done the honest way (protocol.work.replay_batch: collecting and computing the contribution, plus the
   receipt's hash, sketches and signature), each its own epoch so that the policy trains along; then
   coordinator.audit.audit_receipt replaying each receipt. CPU seconds by time.process_time; the first batch and
   audit are a warm-up, not counted. The batch alone is less than a peer spends per batch (it also steps its
   optimizer and runs hivemind), so this ratio bounds the share from above.
2. A real swarm (hivegym-launch --local-peers 2, default settings, no target) for a fixed time: the CPU seconds of
   every process of the run, read from /proc as it runs (the audit worker is the coordinator's child that runs
   niced; the peers are hivegym-join and their children), and from the ledger the receipts accepted, sampled for
   an audit, audited and replayed. CPU per replayed audit and per batch are taken from the first finished replay to
   the end (the audit worker's imports and the peers' start-up left out), with the whole run's figures beside them.
3. The all-honest swarm (2 peers) solving CartPole-v1 with the default settings against one with audits off
   (audit_rate = audit_rate_new = 0: receipts are still signed and checked, never replayed), alternating.

Targets: verification <= 5% of the swarm's compute at the default audit rate, i.e. audit_rate x (CPU per audit /
the peers' CPU per batch), judged on the swarm's figures (on the in-process ones where the swarm has none; a short
run's effective rate, its peers' first receipts being sampled at audit_rate_new, is shown beside it); the swarm with
audits on solves within 1.1x of the time of one with them off.

    python benchmarks/audit_cost.py            # 20 receipts, a 3-minute swarm, 3 runs on and off
    python benchmarks/audit_cost.py --quick    # 8 receipts, a 1-minute swarm, 1 run on and off
    python benchmarks/audit_cost.py --smoke    # 2 receipts, a 1-minute swarm, tiny target: to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_common import machine, print_table

RESULTS = Path(__file__).with_name("results")
SHARE_TARGET = 0.05
SOLVE_RATIO_TARGET = 1.1
AUDITS_OFF = ["audit_rate=0", "audit_rate_new=0"]


# ---- 1. in this process ---------------------------------------------------------------------------------------
def in_process(receipts: int) -> list[dict]:
    import torch

    from hivegym.coordinator.audit import audit_receipt
    from hivegym.protocol.config import RunConfig
    from hivegym.protocol.identity import Identity
    from hivegym.protocol.policy import build_policy
    from hivegym.protocol.receipt import Receipt
    from hivegym.protocol.rollout import Collector
    from hivegym.protocol.work import (batch_seeds, replay_batch, flat_params, params_hash, set_flat_params_, sketch,
                                       sketch_seed)

    torch.set_num_threads(1)
    config = RunConfig()
    identity = Identity.generate()
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    collector = Collector(config.env_id, config.num_envs, 0)  # a peer keeps one; an audit makes its own
    rows = []
    for epoch in range(receipts + 1):
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}  # what the coordinator keeps
        seeds = batch_seeds(config.run_id, identity.public_key, epoch, 0)
        wall, cpu = time.perf_counter(), time.process_time()
        work = replay_batch(policy, config, collector, seeds)
        params = flat_params(policy)
        receipt = Receipt(
            run_id=config.run_id, peer_id=identity.peer_id, epoch=epoch, batch=0, env_steps=len(work.batch),
            returns=work.rollout.env_returns, actions=work.rollout.action_digests(), params_hash=params_hash(policy),
            params_sketch=sketch(params, config.sketch_dim, sketch_seed(config.run_id)),
            update_sketch=sketch(work.update, config.sketch_dim, sketch_seed(config.run_id)),
            collect_s=0.0, compute_s=0.0, step_s=0.0, average_s=0.0, wall_s=0.0)
        receipt.sign(identity)
        batch_cpu, batch_wall = time.process_time() - cpu, time.perf_counter() - wall
        set_flat_params_(policy, params + work.update)  # the next epoch starts from the update
        wall, cpu = time.perf_counter(), time.process_time()
        verdict, detail = audit_receipt(config.to_json(), identity.public_key, receipt, state)
        passed = verdict == "passed"
        audit_cpu, audit_wall = time.process_time() - cpu, time.perf_counter() - wall
        if epoch == 0:
            continue  # warm-up: projection matrix, first calls
        rows.append({"epoch": epoch, "batch_cpu_s": round(batch_cpu, 3), "batch_wall_s": round(batch_wall, 3),
                     "audit_cpu_s": round(audit_cpu, 3), "audit_wall_s": round(audit_wall, 3),
                     "mean_episode_return": round(statistics.mean(work.rollout.episode_returns), 1)
                     if work.rollout.episode_returns else None, "passed": passed, "detail": detail})
        print(f"  receipt {epoch}: batch {batch_cpu:.2f} CPU s, audit {audit_cpu:.2f} CPU s, passed={passed}",
              file=sys.stderr, flush=True)
    collector.close()
    return rows


# ---- 2. a real swarm, CPU from /proc --------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SCHED_IDLE = 5  # the scheduling policy number in /proc/PID/stat (os.SCHED_IDLE on Linux)


def processes() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, priority rank: nice, or 40 for SCHED_IDLE, below every nice value; CPU seconds used:
    user + system) of every process readable in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
        rank = 40 if int(fields[38]) == SCHED_IDLE else int(fields[16])  # fields 41 (policy) and 19 (nice)
        table[int(entry)] = (int(fields[1]), rank, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuMeter:
    """CPU seconds of a process tree by part: 'peers' (hivegym-join and its children), 'auditor' (the audit
    worker: the coordinator's child that runs at a lower priority), 'coordinator' (the rest: trusted peer, its
    hivemind processes, evaluation, gRPC). Parts are decided again at every sample: a child is seen between fork and exec with its
    parent's command line, and the audit worker lowers its priority once it has started."""

    def __init__(self, root: int):
        self.root = root
        self.peer_mains: set[int] = set()
        self.part: dict[int, str] = {}
        self.cpu: dict[int, float] = {}

    def sample(self) -> dict[str, float]:
        table = processes()
        if self.root in table:
            root_nice = table[self.root][1]
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            stack = [(self.root, "coordinator")]
            while stack:
                pid, part = stack.pop()
                if part == "coordinator":
                    if pid in self.peer_mains or "hivegym.peer.cli" in cmdline(pid):
                        self.peer_mains.add(pid)
                        part = "peers"
                    elif table[pid][1] > root_nice:
                        part = "auditor"
                self.part[pid] = part
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), table[pid][2])
                stack += [(child, part) for child in children.get(pid, [])]
        totals = {"peers": 0.0, "auditor": 0.0, "coordinator": 0.0}
        for pid, seconds in self.cpu.items():
            totals[self.part[pid]] += seconds
        return totals


def ledger_counts(path: Path) -> dict[str, int]:
    """Receipts accepted, sampled for an audit, audited (a verdict is in), and of those replayed (passed or failed;
    an 'unmatched' one is judged from its parameter sketch alone, a 'skipped' one not at all)."""
    counts = {"accepted": 0, "sampled": 0, "audited": 0, "replayed": 0}
    if not path.exists():
        return counts
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            row = db.execute("SELECT COUNT(*), COUNT(audit), COUNT(CASE WHEN audit NOT IN ('pending') THEN 1 END), "
                             "COUNT(CASE WHEN audit IN ('passed', 'failed') THEN 1 END) FROM receipts").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return counts
    return dict(zip(counts, row))


def run_measured(overrides: list[str], target: float | None, max_minutes: float, poll_s: float = 1.0) -> dict:
    """hivegym-launch --local-peers 2 to `target` (None: for max_minutes), sampling CPU and the ledger as it runs."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    command = [sys.executable, "-m", "hivegym.coordinator.cli", "--local-peers", "2", "--max-minutes",
               str(max_minutes), "--run-dir", str(run_dir), "--log-level", "WARNING", "--no-dashboard"]
    if target is not None:
        command += ["--target-return", str(target)]
    for item in ["distill_sizes=", *overrides]:  # students in the background would share the cores
        command += ["--set", item]
    with open(run_dir / "launch.log", "wb") as log:
        launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        meter = CpuMeter(launch.pid)
        samples = []  # (cpu by part, ledger counts)
        deadline = time.monotonic() + max_minutes * 60 + 120
        while launch.poll() is None and time.monotonic() < deadline:
            samples.append((meter.sample(), ledger_counts(run_dir / "ledger.sqlite")))
            time.sleep(poll_s)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()
    try:
        os.killpg(launch.pid, signal.SIGKILL)  # anything of its group left behind
    except ProcessLookupError:
        pass
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():  # killed at the deadline: no summary, a lost run
        return {"overrides": overrides, "reached": False, "train_wall_s": None, "error": "no summary.json",
                "run_dir": str(run_dir), **ledger_counts(run_dir / "ledger.sqlite")}
    summary = json.loads(summary_path.read_text())
    first = summary["first_report_s"] or 0.0
    row = {"overrides": overrides, "reached": summary["reached"], "train_wall_s": round(summary["wall_s"] - first, 2),
           "wall_s": summary["wall_s"], "env_steps": summary["env_steps"], "run_dir": str(run_dir),
           **ledger_counts(run_dir / "ledger.sqlite")}
    if not samples:
        return row
    end_cpu, end_counts = samples[-1]
    row.update({f"{part}_cpu_s": round(seconds, 2) for part, seconds in end_cpu.items()})
    row["samples_counted"] = end_counts  # the ledger at the last CPU sample (the run's last second may be missing)
    # from the first finished audit on: the audit worker's start-up (imports) and the peers' are left out
    start = next(((cpu, counts) for cpu, counts in samples if counts["replayed"] >= 1), None)
    if start is not None and end_counts["replayed"] > start[1]["replayed"]:
        audits = end_counts["replayed"] - start[1]["replayed"]
        batches = end_counts["accepted"] - start[1]["accepted"]
        row["steady_audits"], row["steady_batches"] = audits, batches
        row["steady_cpu_per_audit_s"] = round((end_cpu["auditor"] - start[0]["auditor"]) / audits, 3)
        row["steady_peer_cpu_per_batch_s"] = (round((end_cpu["peers"] - start[0]["peers"]) / batches, 3)
                                              if batches else None)
    return row


# ---- report ---------------------------------------------------------------------------------------------------
def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def times(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"


def percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def summarize(local: list[dict], swarm: dict | None, on: list[dict], off: list[dict],
              audit_rate: float) -> tuple[list[dict], dict]:
    """The printed table (values formatted) and the same figures as plain numbers."""
    figures: dict[str, float | None] = {}
    figures["batch_cpu_s"] = median([r["batch_cpu_s"] for r in local])
    figures["audit_cpu_s"] = median([r["audit_cpu_s"] for r in local])
    figures["audit_per_batch"] = ratio(figures["audit_cpu_s"], figures["batch_cpu_s"])
    figures["share_at_default_rate_in_process"] = (None if figures["audit_per_batch"] is None
                                                   else audit_rate * figures["audit_per_batch"])
    target = {"target": f"<= {SHARE_TARGET:.0%}"}
    table = [
        {"measure": "peer: CPU s per batch (replay_batch + receipt; in-process, median)",
         "value": seconds(figures["batch_cpu_s"])},
        {"measure": "coordinator: CPU s per audit (audit_receipt; in-process, median)",
         "value": seconds(figures["audit_cpu_s"])},
        {"measure": "audit / batch CPU (in-process)", "value": times(figures["audit_per_batch"])},
        {"measure": f"verification share at audit_rate {audit_rate:g} vs the batch alone (rate x in-process ratio; "
                    "an upper bound)", "value": percent(figures["share_at_default_rate_in_process"])},
    ]
    judged, share = table[-1], figures["share_at_default_rate_in_process"]
    if swarm:
        counted = swarm.get("samples_counted", swarm)  # the ledger at the last CPU sample
        figures["swarm_effective_rate"] = effective = ratio(swarm["sampled"], swarm["accepted"])
        figures["swarm_peer_cpu_per_batch_s"] = per_batch = swarm.get("steady_peer_cpu_per_batch_s")
        figures["swarm_cpu_per_audit_s"] = per_audit = swarm.get("steady_cpu_per_audit_s")
        figures["swarm_audit_per_batch"] = swarm_ratio = ratio(per_audit, per_batch)
        figures["swarm_expected_share"] = (None if effective is None or swarm_ratio is None
                                           else effective * swarm_ratio)
        figures["share_at_default_rate"] = None if swarm_ratio is None else audit_rate * swarm_ratio
        figures["swarm_measured_share"] = ratio(swarm.get("auditor_cpu_s"), swarm.get("peers_cpu_s"))
        whole_batch = ratio(swarm.get("peers_cpu_s"), counted["accepted"])
        whole_audit = ratio(swarm.get("auditor_cpu_s"), counted["replayed"])
        table += [
            {"measure": f"swarm ({swarm['label']}): receipts accepted / sampled for audit / audited / replayed",
             "value": f"{swarm['accepted']} / {swarm['sampled']} / {swarm['audited']} / {swarm['replayed']}"},
            {"measure": "swarm: effective audit rate (sampled / accepted; a peer's first new_peer_receipts "
                        "at audit_rate_new)", "value": percent(effective)},
            {"measure": "swarm: peers' CPU s per batch (from the first finished replay on)",
             "value": seconds(per_batch)},
            {"measure": "swarm: audit worker CPU s per replayed audit (from the first finished one on)",
             "value": seconds(per_audit)},
            {"measure": "swarm: audit / batch CPU", "value": times(swarm_ratio)},
            {"measure": f"verification share of the swarm's compute at audit_rate {audit_rate:g} (rate x swarm "
                        "ratio)", "value": percent(figures["share_at_default_rate"])},
        ]
        if figures["share_at_default_rate"] is not None:  # the target is judged on the swarm's figure where it has one
            judged, share = table[-1], figures["share_at_default_rate"]
        table += [
            {"measure": "swarm: expected verification share at its effective rate (rate x ratio)",
             "value": percent(figures["swarm_expected_share"])},
            {"measure": "swarm: audit worker CPU / peers' CPU, whole run (start-ups included)",
             "value": percent(figures["swarm_measured_share"])},
            {"measure": "swarm: whole run, peers' CPU s per batch / audit worker CPU s per replayed audit",
             "value": f"{seconds(whole_batch) or '-'} / {seconds(whole_audit) or '-'}"},
        ]
    judged.update(target, verdict="met" if share is not None and share <= SHARE_TARGET else "MISSED")
    figures["wall_on_s"] = median([r["train_wall_s"] for r in on if r["reached"]])
    figures["wall_off_s"] = median([r["train_wall_s"] for r in off if r["reached"]])
    figures["solve_ratio"] = solve_ratio = ratio(figures["wall_on_s"], figures["wall_off_s"])
    table += [
        {"measure": f"all-honest 2-peer swarm, audits on: solved {sum(r['reached'] for r in on)}/{len(on)}, "
                    "median train wall s", "value": figures["wall_on_s"]},
        {"measure": f"all-honest 2-peer swarm, audits off: solved {sum(r['reached'] for r in off)}/{len(off)}, "
                    "median train wall s", "value": figures["wall_off_s"]},
        {"measure": "time to solve, audits on / off", "value": times(solve_ratio),
         "target": f"<= {SOLVE_RATIO_TARGET}x",
         "verdict": "met" if solve_ratio is not None and solve_ratio <= SOLVE_RATIO_TARGET else "MISSED"},
    ]
    return table, {k: None if v is None else round(v, 4) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=20, help="batches and audits timed in this process")
    parser.add_argument("--swarm-minutes", type=float, default=3.0, help="length of the measured swarm (0: none)")
    parser.add_argument("--seeds", type=int, default=3, help="runs of the swarm with audits on, and off")
    parser.add_argument("--quick", action="store_true", help="8 receipts, a 1-minute swarm, 1 run on and off")
    parser.add_argument("--smoke", action="store_true",
                        help="2 receipts, a 1-minute swarm, target return 30 for 1 run on and off")
    parser.add_argument("--out", type=Path, default=RESULTS / "audit_cost.json")
    args = parser.parse_args()
    receipts = 2 if args.smoke else (8 if args.quick else args.receipts)
    swarm_minutes = 1.0 if args.smoke else (1.0 if args.quick else args.swarm_minutes)
    seeds = 1 if (args.quick or args.smoke) else args.seeds
    target, max_minutes = (30.0, 1.0) if args.smoke else (475.0, 4.0)

    from hivegym.protocol.config import RunConfig

    defaults = RunConfig()
    local = in_process(receipts)
    swarm = None
    if swarm_minutes > 0:
        swarm = run_measured([], None, swarm_minutes)
        swarm["label"] = f"2 peers, {swarm_minutes:g} min, no target"
        print(f"  swarm: {swarm['accepted']} receipts, {swarm['audited']} audited, CPU peers "
              f"{swarm.get('peers_cpu_s')} s, audit worker {swarm.get('auditor_cpu_s')} s", file=sys.stderr, flush=True)
    on: list[dict] = []
    off: list[dict] = []
    for seed in range(seeds):
        for label, overrides, rows in ([("on", [], on), ("off", AUDITS_OFF, off)][::1 if seed % 2 == 0 else -1]):
            row = run_measured([f"seed={seed}", *overrides], target, max_minutes)
            row.update(seed=seed, audits=label)
            rows.append(row)
            print(f"  seed {seed} audits {label}: reached={row['reached']} train_wall={row['train_wall_s']}s "
                  f"receipts={row['accepted']} audited={row['audited']}", file=sys.stderr, flush=True)

    table, figures = summarize(local, swarm, on, off, defaults.audit_rate)
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "audit_cost", "seeds": seeds, "target_return": target, "machine": machine(),
        "audit_settings": {k: getattr(defaults, k) for k in ("audit_rate", "audit_rate_new", "new_peer_receipts")},
        "table": table, "figures": figures, "in_process": local, "swarm": swarm, "audits_on": on,
        "audits_off": off}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
