"""End-to-end swarms: real coordinator and peer processes, real DHT, real gRPC, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import build_policy
from procs import Proc, start_coordinator, start_peer, status, wait_for

pytestmark = pytest.mark.slow
SHORT_TTL_S = 6.0  # token_ttl where a test needs a token to lapse during a slow start


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_local_peers_solve_cartpole(tmp_path):
    """The README's main command: a coordinator with two local peers reaches 475 and exits 0."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "hivegym.coordinator.cli", "--local-peers", "2", "--target-return", "475",
         "--max-minutes", "6", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=480,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["reached"] and summary["eval_return"] >= 475
    assert summary["env_steps"] > 0 and summary["epoch"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and {"time", "epoch", "env_steps", "samples_per_second", "peers", "eval_return"} <= rows[-1].keys()
    assert json.loads((run_dir / "summary.json").read_text())["reached"] is True

    # both peers hold the same parameters right after the last global step they both took. A peer that once
    # ended an epoch alone (a round that found no group) keeps averaging with the others under an epoch label
    # one higher, so the other's snapshot may carry the same epoch or the next one
    behind, ahead = sorted((torch.load(run_dir / f"peer-{i}.params.pt", weights_only=True) for i in range(2)),
                           key=lambda snapshots: max(snapshots))
    last = max(behind)
    assert last > 0, f"no global step: {list(behind)}"
    pairs = [epoch for epoch in (last, last + 1) if epoch in ahead]
    assert pairs, f"no snapshot of the other peer at epoch {last} or {last + 1}: {list(ahead)}"
    difference = min(max_difference(behind[last], ahead[epoch]) for epoch in pairs)
    initial = build_policy("CartPole-v1", 64, 2, 0).state_dict()
    assert max_difference(behind[last], initial) > 0.1  # they did train
    assert difference < 1e-3, f"peers differ by {difference} after epoch {last}: {list(behind)} vs {list(ahead)}"


def test_sigkill_one_of_three_peers(tmp_path):
    coordinator, address = start_coordinator(tmp_path, "--max-minutes", "6")
    peers = [start_peer(tmp_path, address, f"p{i}") for i in range(3)]
    try:
        wait_for(lambda: status(address).live_peers == 3 and status(address).epoch >= 3, 180, "3 peers, epoch 3")
        peers[0].kill_group(signal.SIGKILL)  # the whole peer dies at once, mid-whatever it was doing
        killed_at = status(address).epoch
        wait_for(lambda: status(address).epoch >= killed_at + 3, 90, "epochs to advance after the kill")
        wait_for(lambda: status(address).live_peers == 2, 30, "the dead peer to drop out of the live count")
        survivors = status(address).epoch  # and they keep going: an epoch of 65536 samples takes seconds here
        wait_for(lambda: status(address).epoch > survivors, 30, "the two survivors to advance again")
    finally:
        for p in peers:
            p.stop()
        coordinator.stop()


def test_late_joiner_starts_from_swarm_state(tmp_path):
    """The late peer starts slowly (tests/slow_peer.py): its state download comes after the token it bound on
    joining has lapsed, so it loads the state only if it renewed the token meanwhile."""
    coordinator, address = start_coordinator(tmp_path, "--max-minutes", "6", "--set", f"token_ttl={SHORT_TTL_S}")
    first = start_peer(tmp_path, address, "early")
    late: Proc | None = None
    try:
        wait_for(lambda: status(address).epoch >= 5, 180, "epoch 5")
        late = Proc(["tests.slow_peer", str(1.5 * SHORT_TTL_S), "--coordinator", address, "--name", "late",
                     "--identity", str(tmp_path / "late.key"), "--save-params", str(tmp_path / "late.pt")],
                    tmp_path / "late.log")
        wait_for(lambda: "loaded the swarm's state" in late.text() or late.popen.poll() is not None, 90,
                 "the late peer to load state")
        assert late.popen.poll() is None, late.text()[-3000:]
        late.stop()
        snapshots = torch.load(tmp_path / "late.pt", weights_only=True)
        start_epoch = min(snapshots)
        assert start_epoch >= 5, f"late peer started at epoch {start_epoch}"
        initial = build_policy(RunConfig().env_id, 64, 2, 0).state_dict()
        assert max_difference(snapshots[start_epoch], initial) > 0.05, "late peer started from scratch"
        # every download, whenever it lands in the trusted peer's step, matches the hash signed for its epoch
        downloads = Proc(["tests.downloads", "20", "--coordinator", address, "--name", "dl", "--identity",
                          str(tmp_path / "dl.key")], tmp_path / "dl.log")
        out, _ = downloads.popen.communicate(timeout=180)
        assert json.loads(out.decode().strip().splitlines()[-1]) == {"downloads": 20, "matched": 20}, \
            downloads.text()[-3000:]
    finally:
        if late is not None:
            late.stop()
        first.stop()
        coordinator.stop()


def test_sigterm_stops_everything_within_10s(tmp_path):
    coordinator, address = start_coordinator(tmp_path, "--local-peers", "2")
    wait_for(lambda: status(address).live_peers == 2, 120, "two local peers")
    pids = descendants(coordinator.popen.pid)
    started = time.monotonic()
    coordinator.popen.send_signal(signal.SIGTERM)
    out, _ = coordinator.popen.communicate(timeout=15)
    elapsed = time.monotonic() - started
    assert json.loads(out.decode().strip().splitlines()[-1])["reached"] is False  # an orderly exit, not the deadline's
    assert "shutdown did not finish" not in coordinator.text()
    wait_for(lambda: not [p for p in pids if alive(p)], 3, "all processes to be gone", interval=0.1)
    coordinator.stop()
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"


def test_sigterm_to_every_process_still_stops_within_10s(tmp_path):
    # as systemd and `docker stop` do: hivemind's helper processes die first, and the rounds that the main
    # processes wait on never finish; the stop deadline must still end everything
    coordinator, address = start_coordinator(tmp_path, "--local-peers", "2")
    wait_for(lambda: status(address).live_peers == 2 and status(address).epoch >= 1, 120, "two peers, epoch 1")
    pids = [coordinator.popen.pid, *descendants(coordinator.popen.pid)]
    started = time.monotonic()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_for(lambda: not [p for p in pids if alive(p)], 12, "all processes to be gone", interval=0.1)
    elapsed = time.monotonic() - started
    coordinator.stop()
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"


def descendants(pid: int) -> list[int]:
    from hivegym.protocol.shutdown import descendants as find

    return find(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
