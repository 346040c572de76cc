"""Joining from other hosts: hivegym-join's preflight, and a swarm across three network namespaces."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

import compose
import netns
from hivegym.peer.cli import parse_args
from hivegym.peer.preflight import check_bootstrap, tcp_endpoint
from procs import Proc, wait_for

PEER_ID = "12D3KooWGyU75bZS5iyzoCra23zBKMe3dbToFU2xLQSixMpr9vaM"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_mode_is_the_default_and_explicit():
    assert parse_args(["--coordinator", "h:1"]).client_mode is True
    assert parse_args(["--coordinator", "h:1", "--client-mode"]).client_mode is True
    assert parse_args(["--coordinator", "h:1", "--no-client-mode"]).client_mode is False
    args = parse_args(["--coordinator", "h:1", "--no-client-mode", "--auto-relay", "--no-relay",
                       "--host-maddrs", "/ip4/0.0.0.0/tcp/4000", "--announce-maddrs", "/ip4/1.2.3.4/tcp/4000"])
    assert (args.auto_relay, args.use_relay, args.host_maddrs) == (True, False, ["/ip4/0.0.0.0/tcp/4000"])


def test_tcp_endpoint():
    assert tcp_endpoint(f"/ip4/10.0.0.1/tcp/31337/p2p/{PEER_ID}") == ("10.0.0.1", 31337)
    assert tcp_endpoint("/dns4/coordinator.example/tcp/4000") == ("coordinator.example", 4000)
    assert tcp_endpoint("/ip6/::1/tcp/5") == ("::1", 5)
    assert tcp_endpoint("/ip4/10.0.0.1/udp/4000/quic") is None
    assert tcp_endpoint("/ip4/10.0.0.1/tcp/x") is None and tcp_endpoint("garbage") is None


def test_bootstrap_check_needs_one_reachable_address():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port, closed = listening.getsockname()[1], closed_port()
        maddrs = [f"/ip4/127.0.0.1/tcp/{closed}/p2p/{PEER_ID}", f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}"]
        assert check_bootstrap(maddrs) == (f"127.0.0.1:{port}", None)
    reachable, problem = check_bootstrap(maddrs)
    assert reachable == "" and "only loopback addresses" in problem and "--announce-maddrs" in problem
    assert "no bootstrap addresses" in check_bootstrap([])[1]


def test_join_prints_one_line_per_failed_check():
    # no coordinator at that port, and a listen address that is not this machine's: the p2p daemon cannot start
    result = subprocess.run(
        [sys.executable, "-m", "hivegym.peer.cli", "--coordinator", f"127.0.0.1:{closed_port()}",
         "--host-maddrs", "/ip4/203.0.113.7/tcp/4000"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["coordinator", "p2p daemon"], result.stderr
    assert all(line.startswith("hivegym-join: ") for line in lines)
    assert "203.0.113.7" in lines[1] and "--host-maddrs" in lines[1]


@pytest.mark.slow
def test_swarm_across_three_hosts(tmp_path):
    """Coordinator and two peers on three network namespaces, with the compose file's commands (its address
    replaced by the first namespace's): the peers reach it only through the bridge, and CartPole is solved."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.Lab(3) as lab:
        commands = compose.commands({"172.28.0.10": lab.addresses[0], "/data": str(tmp_path)})
        (tmp_path / "identity").mkdir()
        # no evaluation before epoch 4, so both peers take part in several rounds before the target can end it
        coordinator = Proc([*commands.pop("coordinator"), "--target-return", "475", "--max-minutes", "4",
                            "--set", "eval_every=4"],
                           tmp_path / "coordinator.log", prefix=lab.prefix(0))
        peers: list[Proc] = []
        try:
            info = tmp_path / "run" / "coordinator.json"
            wait_for(lambda: info.exists() or coordinator.popen.poll() is not None, 90, "coordinator start")
            assert json.loads(info.read_text())["maddrs"][0].startswith(f"/ip4/{lab.addresses[0]}/tcp/31337/p2p/")
            peers = [Proc(command, tmp_path / f"{name}.log", prefix=lab.prefix(i + 1))
                     for i, (name, command) in enumerate(commands.items())]
            out, _ = coordinator.popen.communicate(timeout=270)
            assert coordinator.popen.returncode == 0, coordinator.text()[-3000:]
            summary = json.loads(out.decode().strip().splitlines()[-1])
            assert summary["reached"] and summary["eval_return"] >= 475
            rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
            assert summary["epoch"] >= 4 and max(row["peers"] for row in rows) == 2
            for name, peer in zip(commands, peers):
                assert f"peer {name} (" in coordinator.text()  # "peer NAME (PEER ID) joined (DEVICE)"
                assert f"bootstrap {lab.addresses[0]}:31337 reachable" in peer.text(), peer.text()[-2000:]
        finally:
            for p in peers:
                p.stop()
            coordinator.stop()
