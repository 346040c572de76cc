"""hivegym-launch and hivegym-join as real processes: --help, config errors, an unreachable coordinator."""

import socket
import subprocess
import sys

import pytest

from hivegym.protocol.identity import format_join

LAUNCH = "hivegym.coordinator.cli"
JOIN = "hivegym.peer.cli"


def run(module: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("module, prog", [(LAUNCH, "hivegym-launch"), (JOIN, "hivegym-join")])
def test_help_exits_zero(module, prog):
    result = run(module, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog}")
    assert result.stderr == ""


@pytest.mark.parametrize("module", [LAUNCH, JOIN])
def test_help_imports_no_heavy_modules(module):
    # --help stays fast because parsing the arguments needs neither torch nor hivemind
    code = f"""
import sys
from {module} import parse_args
try:
    parse_args(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "hivemind", "gymnasium", "grpc", "numpy") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("setting, key", [("bogus=1", "bogus"), ("learning_rate=-1", "learning_rate"),
                                          ("num_envs=x", "num_envs")])
def test_launch_config_error_exits_2(setting, key):
    result = run(LAUNCH, "--set", setting)
    assert result.returncode == 2
    assert key in result.stderr
    assert result.stderr.startswith("hivegym-launch: config error:")
    assert "Traceback" not in result.stderr


def test_launch_missing_config_file_exits_2(tmp_path):
    result = run(LAUNCH, "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr and "Traceback" not in result.stderr


def test_join_requires_coordinator():
    result = run(JOIN)
    assert result.returncode == 2
    assert "--coordinator" in result.stderr


def test_join_unreachable_coordinator_fails_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(JOIN, "--coordinator", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hivegym-join:")
    assert f"127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in result.stderr


def test_join_unreachable_bootstrap_fails_with_one_line(tmp_path):
    # a real coordinator gRPC server (verifier, ledger) whose bootstrap multiaddr points at a closed port
    from hivegym.protocol.config import RunConfig
    from servers import TestServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    maddr = f"/ip4/127.0.0.1/tcp/{closed}/p2p/12D3KooWGyU75bZS5iyzoCra23zBKMe3dbToFU2xLQSixMpr9vaM"
    server = TestServer(tmp_path, config=RunConfig(), maddrs=[maddr])
    try:  # the join string carries the coordinator's key, so the peer's Join is checked for real
        result = run(JOIN, "--coordinator", format_join(server.address, server.identity.public_key),
                     "--identity", str(tmp_path / "peer.key"), timeout=60)
        joined = [row["peer_name"] for row in server.ledger.leaderboard()]
    finally:
        server.close()
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("hivegym-join:")]
    assert len(lines) == 1 and "bootstrap" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert len(joined) == 1  # it got as far as a verified Join
