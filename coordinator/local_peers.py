"""Peers started on this machine as child processes, each in its own process group, stopped as a group.

A peer's hivemind side is five processes (main, DHT, two averagers, p2pd); killing only the main one leaves
the rest running and stalling the swarm, so a peer is always signalled through its process group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class LocalPeer:
    def __init__(self, name: str, coordinator: str, log_path: Path, extra_args: list[str] = ()):
        self.name = name
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hivegym.peer.cli", "--coordinator", coordinator, "--name", name, *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pgid = self.process.pid  # start_new_session: the peer leads its own group

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def alive(self) -> bool:
        """True while any process of the peer's group remains."""
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def stop_all(peers: list[LocalPeer], grace_s: float = 4.0) -> None:
    """SIGTERM every group, SIGKILL what is left after grace_s, reap the main processes."""
    for peer in peers:
        peer.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.alive() for p in peers) and time.monotonic() < deadline:
        for p in peers:
            p.process.poll()
        time.sleep(0.05)
    for peer in peers:
        if peer.alive():
            logger.warning("peer %s did not stop within %.0fs; killing its process group", peer.name, grace_s)
            peer.signal(signal.SIGKILL)
        try:
            peer.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        peer.log.close()
