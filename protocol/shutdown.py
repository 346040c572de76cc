"""Stopping a process that hivemind may hold: signal handlers with a deadline, and no helper process left behind.

hivemind waits on its helper processes (DHT, averagers) without timeouts. When a signal reaches those too (a
terminal's Ctrl-C reaches the whole foreground group; systemd and Docker signal every process), the main thread
can wait forever on a round that will never finish, so a stop request arms a deadline after which the process
kills what it started and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)


def stop_on_signals(stop: threading.Event, deadline_s: float, before_exit: Callable[[], None] = lambda: None
                    ) -> Callable[..., None]:
    """SIGINT and SIGTERM set `stop`; if the process is still here `deadline_s` later, before_exit() runs, every
    descendant is killed and the process exits with status 1. Returns the handler, for stops of other causes."""

    def force_exit() -> None:
        logger.error("shutdown did not finish within %.0f s; killing the processes left", deadline_s)
        try:
            before_exit()
        finally:
            kill_descendants()
            os._exit(1)

    def handle(*_) -> None:
        if not stop.is_set():
            stop.set()
            timer = threading.Timer(deadline_s, force_exit)
            timer.daemon = True  # a process that finishes its shutdown in time exits without waiting for it
            timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    return handle


def descendants(pid: int) -> list[int]:
    """All live descendants of a process (Linux /proc; empty elsewhere)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def kill_descendants() -> None:
    """Last resort at exit: no hivemind helper process (p2pd, averagers) outlives this one.
    torch's shared-memory manager and multiprocessing's resource tracker are spared: both leave by themselves,
    torch aborts at exit without its manager, and a killed tracker is relaunched and prints tracebacks."""
    for pid in descendants(os.getpid()):
        try:
            if (Path(f"/proc/{pid}/comm").read_text().startswith("torch_shm")
                    or b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()):
                continue
        except OSError:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if sys.platform == "linux":
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
