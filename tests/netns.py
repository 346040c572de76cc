"""Several hosts on one machine: network namespaces on one subnet, joined by veth pairs to a bridge that sits in
a namespace of its own, so nothing is added to the machine's own network. Root only."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"hg-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"ip netns add failed: {(getattr(e, 'stderr', '') or str(e)).strip()[:200]}"
    ip("netns", "del", probe)
    return None


class Lab:
    """`with Lab(3) as lab:` hosts lab.names[i] at lab.addresses[i] (10.77.0.1, ...); always torn down."""

    def __init__(self, hosts: int, subnet: str = "10.77.0"):
        tag = secrets.token_hex(3)  # unique names per run: a crashed run's leftovers never collide
        self.switch = f"hg-{tag}-sw"
        self.names = [f"hg-{tag}-h{i}" for i in range(hosts)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(hosts)]
        self.created: list[str] = []

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.add(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            self.add(name)
            ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def add(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def down(self) -> None:
        """Deleting a namespace deletes its ends of the veth pairs, and with them the other ends."""
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()

    def prefix(self, host: int) -> list[str]:
        """Command prefix that runs a program on host `host`."""
        return ["ip", "netns", "exec", self.names[host]]
