"""Start real coordinator and peer processes for end-to-end tests, each in its own process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hivegym.protocol.rpc import CoordinatorClient


class Proc:
    def __init__(self, args: list[str], log: Path, prefix: list[str] = ()):
        """`python -m args`, after `prefix` (e.g. ip netns exec NAME) if given."""
        self.log_path = log
        self.log = open(log, "wb")
        self.popen = subprocess.Popen([*prefix, sys.executable, "-m", *args], stdout=subprocess.PIPE,
                                      stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left."""
        self.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            self.popen.poll()
            time.sleep(0.1)
        self.kill_group(signal.SIGKILL)
        self.popen.wait(timeout=5)
        self.log.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_coordinator(run_dir: Path, *args: str) -> tuple[Proc, str]:
    """hivegym-launch in the background; returns it and its gRPC address once it serves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc(["hivegym.coordinator.cli", "--run-dir", str(run_dir), *args], run_dir / "coordinator.log")
    info = run_dir / "coordinator.json"
    wait_for(lambda: info.exists() or proc.popen.poll() is not None, 60, "coordinator start")
    assert proc.popen.poll() is None, proc.text()
    return proc, json.loads(info.read_text())["grpc"]


def start_peer(run_dir: Path, address: str, name: str, *args: str, cheat: str | None = None) -> Proc:
    """hivegym-join with its own key file; with `cheat`, the cheating peer of that name (tests/adversaries)."""
    module = ["tests.adversaries.peer", cheat] if cheat else ["hivegym.peer.cli"]
    return Proc([*module, "--coordinator", address, "--name", name, "--identity", str(run_dir / f"{name}.key"), *args],
                run_dir / f"{name}.log")


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def status(address: str):
    client = CoordinatorClient(address, timeout=5, retries=2)
    try:
        return client.status()
    finally:
        client.close()
