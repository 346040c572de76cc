"""How fast each cheating peer is caught at the default audit rates, and what it costs the swarm's time to solve.

Every cheat of tests/adversaries/peer.py joins a swarm (hivegym-launch + 1 honest peer + the cheater) on
CartPole-v1 with the default audit rates; an all-honest swarm (hivegym-launch + 2 honest peers) runs in the same
rounds, the order of the swarms rotating from round to round. A run goes on past the target return until the cheater
is caught (or the time limit), so that a swarm which solves first does not hide how long the catch takes; the time
to solve is read off the coordinator's evaluations as they happen (from the first finished rollout, like the
other benchmarks' train_wall_s).

"Receipts until caught" counts the receipts the cheater handed in (accepted or refused) before it was caught:
- banned (strikes_to_ban strikes: failed audits, or rounds into which it sent something other than what its
  receipts say): every receipt the coordinator accepted from it (a ban refuses all later ones) plus the ones
  refused for other reasons before;
- refused (a duplicate, a bad signature, an expired token): those handed in before its first such refusal;
- refused by the trusted averagers (no token bound to its hivemind id, or an expired one): those accepted before
  the coordinator's first "refused averager access" for its hivemind id.
Whichever comes first is "caught by". Receipts are counted from when the cheat begins: at once, except for
expired_token, whose receipts are legitimate until its token expires (token_ttl after it was bound; the count from
joining is in each run's receipts_from_join_until_caught). receipts_to_evidence is, for a ban, the receipts accepted
up to the one whose failed audit was the strikes_to_ban-th (the rest is the audit queue's latency); s_to_catch the
seconds from the cheat's start (its hivemind id in its log) to the catch. A run in which the cheater was never caught
counts as infinitely many receipts in the median. Target: every cheat caught within 60 receipts.
honest_false_alarms counts what went against the honest peers (failed audits, round-check strikes, bans, refused
averager access); each run's honest_alarms says what each was.

    python benchmarks/adversaries.py            # 5 runs of every cheat
    python benchmarks/adversaries.py --quick    # 2 runs of 5 cheats (one per way of being caught)
    python benchmarks/adversaries.py --cheats no_token expired_token --runs 3
    python benchmarks/adversaries.py --smoke    # 1 run of 1 cheat, tiny target: to check that it runs
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/procs.py and tests/adversaries (the cheating peers)

from benchmarks_common import machine, print_table  # noqa: E402

RESULTS = Path(__file__).with_name("results")
TARGET_RECEIPTS = 60
QUICK_CHEATS = ["fabricated_returns", "sends_other", "replayed_receipt", "forged_signature", "no_token"]
SMOKE_CHEATS = ["fabricated_returns"]
CAUGHT_CODES = {"ALREADY_EXISTS", "UNAUTHENTICATED", "INVALID_ARGUMENT", "PERMISSION_DENIED"}  # not honest mishaps
POLL_S = 0.25

EVALUATION = re.compile(r"evaluation at epoch \d+: mean return (-?[\d.]+|nan|inf)")
AVERAGER_REFUSED = re.compile(r"refused averager access to (\w+)")
HIVEMIND_ID = re.compile(r"hivemind peer id (\w+)")
RECEIPT_REFUSED = re.compile(r"receipt for epoch \d+ batch \d+ refused: ([A-Z_]+)")


class Tail:
    """The complete lines appended to a log file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *complete, self.rest = (self.rest + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]


def ledger_query(path: Path, query: str, args: tuple = ()) -> list[tuple]:
    """Read the coordinator's ledger (SQLite, WAL) while it runs, without writing to it."""
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def key_peer_id(path: Path) -> str | None:
    from hivegym.protocol.identity import Identity

    try:
        return Identity.load(path).peer_id
    except (OSError, ValueError):  # not written yet
        return None


def honest_alarms(ledger: Path, libp2p: dict[str, str | None], averager_refused: dict[str, list[float]]) -> list[str]:
    """What went against the honest peers, one line each: failed audits (with the verifier's detail), round-check
    strikes (strikes beyond the failed audits), a ban (with its reason), refused averager access."""
    alarms = []
    for name, hivemind_id in libp2p.items():
        for peer_id, strikes, banned, reason in ledger_query(
                ledger, "SELECT peer_id, strikes, banned, ban_reason FROM peers WHERE name = ?", (name,)):
            failed = ledger_query(ledger, "SELECT epoch, batch, audit_detail FROM receipts WHERE peer_id = ? AND "
                                          "audit = 'failed'", (peer_id,))
            alarms += [f"{name}: audit of epoch {e} batch {b} failed: {detail}" for e, b, detail in failed]
            alarms += [f"{name}: round-check strike"] * max(strikes - len(failed), 0)
            alarms += [f"{name}: banned: {reason}"] if banned else []
        refused = averager_refused.get(hivemind_id, []) if hivemind_id else []
        alarms += [f"{name}: averager access refused {len(refused)} time(s)"] if refused else []
    return alarms


def cheat_began(cheat: str, bound: float, token_ttl: float) -> float:
    """When the cheat begins (unix seconds): at once, but expired_token at its token's expiry (its receipts before
    are legitimate), token_ttl after its token was bound to its hivemind id, which it asks for right after logging
    that id (`bound`, when that line was seen)."""
    return bound + token_ttl if cheat == "expired_token" else 0.0


def run_once(cheat: str | None, target: float, max_minutes: float, strikes_to_ban: int, token_ttl: float) -> dict:
    """One swarm: coordinator + honest-0 + (the cheater, or honest-1). Stops once it has solved and the cheater is
    caught (or has exited), or at max_minutes."""
    from procs import Proc, start_peer, wait_for

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-adv-{cheat or 'honest'}-"))
    coordinator = Proc(["hivegym.coordinator.cli", "--run-dir", str(run_dir), "--max-minutes", str(max_minutes),
                        "--no-dashboard", "--set", "distill_sizes="],  # students would share the cores
                       run_dir / "coordinator.log")
    info = run_dir / "coordinator.json"
    try:
        wait_for(lambda: info.exists() or coordinator.popen.poll() is not None, 180, "coordinator start")
        assert coordinator.popen.poll() is None, coordinator.text()[-2000:]
    except AssertionError:
        coordinator.stop()
        raise
    join = json.loads(info.read_text())["join"]
    other = "cheater" if cheat else "honest-1"
    peers = {"honest-0": start_peer(run_dir, join, "honest-0"), other: start_peer(run_dir, join, other, cheat=cheat)}
    logs = {name: Tail(run_dir / f"{name}.log") for name in peers}
    coordinator_log = Tail(run_dir / "coordinator.log")
    libp2p: dict[str, str] = {}  # peer name -> its hivemind id
    libp2p_seen: dict[str, float] = {}  # peer name -> when it logged its hivemind id (just before binding its token)
    averager_refused: dict[str, list[float]] = {}  # hivemind id -> when its refusals were seen
    refusals: list[tuple[float, str]] = []  # the cheater's refused receipts: (when seen, gRPC code)
    solved_at = ban_at = None
    cheater_id = None
    ledger = run_dir / "ledger.sqlite"
    try:
        while coordinator.popen.poll() is None:
            now = time.time()
            for line in coordinator_log.lines():
                m = EVALUATION.search(line)
                if m and solved_at is None and float(m.group(1)) >= target:
                    solved_at = now
                m = AVERAGER_REFUSED.search(line)
                if m:
                    averager_refused.setdefault(m.group(1), []).append(now)
            for name, tail in logs.items():
                for line in tail.lines():
                    m = HIVEMIND_ID.search(line)
                    if m:
                        libp2p[name] = m.group(1)
                        libp2p_seen.setdefault(name, now)
                    m = RECEIPT_REFUSED.search(line)
                    if m and name == "cheater":
                        refusals.append((now, m.group(1)))
            if cheat:
                cheater_id = cheater_id or key_peer_id(run_dir / "cheater.key")
                if ban_at is None and cheater_id and ledger_query(
                        ledger, "SELECT banned FROM peers WHERE peer_id = ?", (cheater_id,)) == [(1,)]:
                    ban_at = now
                began = cheat_began(cheat, libp2p_seen.get("cheater", math.inf), token_ttl)
                caught = (ban_at is not None or any(code in CAUGHT_CODES and t >= began for t, code in refusals)
                          or any(t >= began for t in averager_refused.get(libp2p.get("cheater"), [])))
                if solved_at is not None and (caught or peers["cheater"].popen.poll() is not None):
                    break
            elif solved_at is not None:
                break
            time.sleep(POLL_S)
        ended = time.time()
        exited = coordinator.popen.poll()  # None: still running, as it should be unless max_minutes passed
        if coordinator.popen.poll() is None:  # its SIGTERM handler ends the run and writes summary.json
            coordinator.popen.send_signal(signal.SIGTERM)
            try:
                coordinator.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # stop() below kills its group
    finally:
        coordinator.stop()
        for peer in peers.values():
            peer.stop()
    for line in coordinator_log.lines():  # what the coordinator wrote while stopping
        m = AVERAGER_REFUSED.search(line)
        if m:
            averager_refused.setdefault(m.group(1), []).append(ended)
    for line in logs.get("cheater", Tail(run_dir / "-")).lines():
        m = RECEIPT_REFUSED.search(line)
        if m:
            refusals.append((ended, m.group(1)))

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    row = {"cheat": cheat or "-", "run_dir": str(run_dir), "reached": solved_at is not None,
           "train_wall_s": None, "total_wall_s": None}
    if exited and not summary:  # the coordinator failed by itself: a lost run, not a cheater that got away
        row.update(error=f"the coordinator exited with code {exited}: {coordinator.text()[-1500:]}",
                   honest_false_alarms=0, caught=False, caught_by=None, receipts_until_caught=None,
                   receipts_to_evidence=None)
        return row
    started = first_report = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().strip():
        first_row = json.loads(metrics.read_text().splitlines()[0])
        started = first_row["time"] - first_row["wall_s"]  # the coordinator's start, unix seconds
        first_report = summary.get("first_report_s")
    if solved_at is not None and started is not None:
        row["total_wall_s"] = round(solved_at - started, 2)
        if first_report is None or first_report > row["total_wall_s"]:
            first_report = 0.0  # solved before any peer's first receipt (a tiny target): like a run that stops there
        row["train_wall_s"] = round(row["total_wall_s"] - first_report, 2)

    row["honest_alarms"] = honest_alarms(ledger, {n: libp2p.get(n) for n in ("honest-0", "honest-1")},
                                         averager_refused)
    row["honest_false_alarms"] = len(row["honest_alarms"])
    if not cheat:
        return row

    cheater_id = cheater_id or key_peer_id(run_dir / "cheater.key")
    accepted = ledger_query(ledger, "SELECT received, audit FROM receipts WHERE peer_id = ? ORDER BY received",
                            (cheater_id,)) if cheater_id else []
    standing = ledger_query(ledger, "SELECT banned, strikes FROM peers WHERE peer_id = ?", (cheater_id,))
    banned, strikes = standing[0] if standing else (0, 0)
    if banned and ban_at is None:
        ban_at = ended  # banned between the last look and the end
    failed = [received for received, audit in accepted if audit == "failed"]
    # strikes are failed audits, or rounds into which it sent something other than what its receipts say
    round_strikes = max(strikes - len(failed), 0)
    ban_by = ("failed audits" if not round_strikes else "round checks" if not failed
              else "failed audits + round checks")
    began = cheat_began(cheat, libp2p_seen.get("cheater", math.inf), token_ttl)
    events = []  # (when, how, when each receipt refused before it was seen)
    if ban_at is not None:
        events.append((ban_at, f"banned ({ban_by})", [t for t, _ in refusals if t <= ban_at]))
    first = next((i for i, (t, code) in enumerate(refusals) if code in CAUGHT_CODES and t >= began), None)
    if first is not None:
        when, code = refusals[first]
        events.append((when, f"receipts refused ({code})", [t for t, _ in refusals[:first]]))
    when = next((t for t in averager_refused.get(libp2p.get("cheater"), []) if t >= began), None)
    if when is not None:
        events.append((when, "averagers refused it", [t for t, _ in refusals if t < when]))
    row.update(caught=bool(events), caught_by=None, receipts_until_caught=None,
               receipts_to_evidence=(sum(r <= failed[strikes_to_ban - 1] for r, _ in accepted)
                                     if len(failed) >= strikes_to_ban and not round_strikes else None),
               receipts_handed_in=len(accepted) + len(refusals), accepted=len(accepted),
               sampled=sum(audit is not None for _, audit in accepted), audits_failed=len(failed),
               round_strikes=round_strikes,
               refusals=summary.get("refusals", {}).get(cheater_id, {}) if cheater_id else {})
    if events:
        when, how, refused = min(events)
        row["caught_by"] = how
        row["receipts_until_caught"] = sum(began < r <= when for r, _ in accepted) + sum(began <= t for t in refused)
        row["receipts_from_join_until_caught"] = sum(r <= when for r, _ in accepted) + len(refused)
        row["caught_after_s"] = round(when - max(began, libp2p_seen.get("cheater", when)), 1)  # from the cheat's start
    return row


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def summarize(runs: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """One row per swarm; runs whose swarm did not start ('error') are left out and counted as lost."""
    def done(rows: list[dict]) -> list[dict]:
        return [r for r in rows if "error" not in r]

    def lost(rows: list[dict]) -> dict:
        return {"lost_runs": len(rows) - len(done(rows))} if len(done(rows)) < len(rows) else {}

    honest_rows = done(runs["honest"])
    honest = median_or_none([r["train_wall_s"] for r in honest_rows if r["train_wall_s"] is not None])
    table = [{"swarm": "all honest", "caught_by": None, "caught": None, "receipts_until_caught": None,
              "receipts_to_evidence": None, "s_to_catch": None,
              "solved": f"{sum(r['reached'] for r in honest_rows)}/{len(honest_rows)}",
              "median_train_wall_s": honest, "solve_time_ratio": 1.0 if honest else None,
              "honest_false_alarms": sum(r["honest_false_alarms"] for r in honest_rows), "target": None,
              **lost(runs["honest"])}]
    targets = []
    for cheat, all_rows in runs.items():
        if cheat == "honest":
            continue
        rows = done(all_rows)
        until = [r["receipts_until_caught"] if r["caught"] else math.inf for r in rows]
        measured = statistics.median(until) if until else math.inf
        wall = median_or_none([r["train_wall_s"] for r in rows if r["train_wall_s"] is not None])
        how = collections.Counter(r["caught_by"] for r in rows if r["caught"]).most_common()
        met = measured <= TARGET_RECEIPTS
        table.append({
            "swarm": cheat, "caught_by": " / ".join(h for h, _ in how) or "not caught",
            "caught": f"{sum(r['caught'] for r in rows)}/{len(rows)}",
            "receipts_until_caught": None if math.isinf(measured) else measured,
            "receipts_to_evidence": median_or_none([r["receipts_to_evidence"] for r in rows
                                                    if r["receipts_to_evidence"] is not None]),
            "s_to_catch": median_or_none([r["caught_after_s"] for r in rows if r.get("caught_after_s") is not None]),
            "solved": f"{sum(r['reached'] for r in rows)}/{len(rows)}", "median_train_wall_s": wall,
            "solve_time_ratio": round(wall / honest, 2) if wall and honest else None,
            "honest_false_alarms": sum(r["honest_false_alarms"] for r in rows),
            "target": "met" if met else "MISSED", **lost(all_rows)})
        targets.append({"cheat": cheat, "target": f"caught within {TARGET_RECEIPTS} receipts (median)",
                        "measured": None if math.isinf(measured) else measured, "caught_by": table[-1]["caught_by"],
                        "caught_runs": table[-1]["caught"], "met": met})
    return table, targets


def main() -> None:
    from tests.adversaries.peer import CHEATS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per cheat (and of the all-honest swarm)")
    parser.add_argument("--cheats", nargs="+", choices=list(CHEATS), default=None, help="default: every cheat")
    parser.add_argument("--quick", action="store_true", help=f"2 runs of {', '.join(QUICK_CHEATS)}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"1 run of {', '.join(SMOKE_CHEATS)}, target return 30, 1.5 minutes per swarm")
    parser.add_argument("--target-return", type=float, default=None, help="default 475 (--smoke: 30)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="limit per swarm (default 5; --quick 3): past token_ttl, for expired_token")
    parser.add_argument("--out", type=Path, default=RESULTS / "adversaries.json")
    args = parser.parse_args()
    runs = 1 if args.smoke else (2 if args.quick else args.runs)
    cheats = args.cheats or [c for c in (SMOKE_CHEATS if args.smoke else QUICK_CHEATS if args.quick else CHEATS)
                             if c in CHEATS]
    target = args.target_return or (30.0 if args.smoke else 475.0)
    max_minutes = args.max_minutes or (1.5 if args.smoke else 3.0 if args.quick else 5.0)
    out = args.out.resolve()
    os.chdir(ROOT)  # the cheating peers run as `python -m tests.adversaries.peer`

    from hivegym.protocol.config import RunConfig

    defaults = RunConfig()
    swarms = ["honest", *cheats]
    results: dict[str, list[dict]] = {name: [] for name in swarms}
    for round_ in range(runs):
        order = swarms[round_ % len(swarms):] + swarms[:round_ % len(swarms)]  # rotate who goes first
        for name in order:
            started = time.monotonic()
            try:
                row = run_once(None if name == "honest" else name, target, max_minutes, defaults.strikes_to_ban,
                               defaults.token_ttl)
            except AssertionError as e:  # the swarm did not start (procs.py's checks): a lost run, not a lost benchmark
                row = {"cheat": name, "error": str(e)[-2000:], "reached": False, "train_wall_s": None,
                       "honest_false_alarms": 0, "caught": False, "caught_by": None, "receipts_until_caught": None,
                       "receipts_to_evidence": None}
            row["round"] = round_
            results[name].append(row)
            print(f"  round {round_} {name}: reached={row['reached']} train_wall={row['train_wall_s']} "
                  f"caught_by={row.get('caught_by')} receipts_until_caught={row.get('receipts_until_caught')} "
                  f"({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
            for alarm in row.get("honest_alarms", []):
                print(f"    honest false alarm: {alarm}", file=sys.stderr, flush=True)

    table, targets = summarize(results)
    print_table(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "adversaries", "target_return": target, "seeds": runs, "runs_per_swarm": runs,
        "max_minutes": max_minutes, "machine": machine(),
        "audit_settings": {k: getattr(defaults, k) for k in ("audit_rate", "audit_rate_new", "new_peer_receipts",
                                                                 "strikes_to_ban", "token_ttl")},
        "cheats": {c: CHEATS[c] for c in cheats}, "target_receipts": TARGET_RECEIPTS, "table": table,
        "targets": targets, "runs": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
