"""hivegym-join's checks before training: the coordinator answers, a bootstrap peer is reachable, the p2p daemon
starts. Each failed check is one line that says what to do."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Callable

import grpc

from hivegym.peer import swarm
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.rpc import CoordinatorClient, describe_error

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
LAUNCH_HINT = ("launch the coordinator with --host-maddrs /ip4/0.0.0.0/tcp/PORT --announce-maddrs "
               "/ip4/ITS_PUBLIC_IP/tcp/PORT and open PORT/tcp in its firewall")


def preflight(client: CoordinatorClient, join: Callable[[], pb.JoinReply], p2p_options: dict
              ) -> tuple[pb.JoinReply | None, list[str]]:
    """Join the coordinator (join() sends the request) and run the checks; returns the Join reply (None if it
    failed) and the failures. Passed checks are logged in one line, and only when all passed."""
    failures, passed, reply = [], [], None
    started = time.monotonic()
    try:
        reply = join()
        passed.append(f"coordinator {client.address} answers ({time.monotonic() - started:.2f} s)")
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            failures.append(f"coordinator: {client.address} does not answer ({describe_error(e)}); check the "
                            "address (HOST:PORT as hivegym-launch printed it), that hivegym-launch runs there, and "
                            "that its --port is open to this host")
        else:
            failures.append(f"coordinator: {client.address} refused to let this peer join ({describe_error(e)})")
    if reply is not None:
        reachable, problem = check_bootstrap(list(reply.bootstrap_maddrs))
        if problem:
            failures.append(f"bootstrap: {problem}")
        else:
            passed.append(f"bootstrap {reachable} reachable")
    problem = swarm.check_p2p_daemon(**p2p_options)
    if problem:
        failures.append(f"p2p daemon: hivemind's p2pd does not start ({problem}); check --host-maddrs (an address "
                        "of this machine), that /tmp is writable, and reinstall hivemind==1.1.12 if it persists")
    else:
        passed.append("p2p daemon starts")
    if not failures:
        logger.info("preflight passed: %s", "; ".join(passed))
    return reply, failures


def tcp_endpoint(maddr: str) -> tuple[str, int] | None:
    """(host, port) of an /ip4, /ip6 or /dns* multiaddr over TCP; None for anything else (e.g. QUIC)."""
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        return None
    try:
        return parts[1], int(parts[3])
    except ValueError:
        return None


def check_bootstrap(maddrs: list[str]) -> tuple[str, str | None]:
    """(the address that answered, None) once a TCP connection to a bootstrap multiaddr opens, else
    ("", what is wrong). Multiaddrs that are not TCP are not checked."""
    if not maddrs:
        return "", "the coordinator announced no bootstrap addresses; is it still starting? try again"
    endpoints = [e for e in map(tcp_endpoint, maddrs) if e is not None]
    if not endpoints:
        return "(not TCP: unchecked)", None
    errors = []
    for host, port in endpoints:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return f"{host}:{port}", None
        except OSError as e:
            errors.append(f"{host}:{port} {e.strerror or type(e).__name__}")
    if all(is_loopback(host) for host, _ in endpoints):
        return "", (f"the coordinator announces only loopback addresses ({', '.join(errors)}): peers on other "
                    f"hosts cannot reach it; {LAUNCH_HINT}")
    return "", f"no bootstrap address is reachable over TCP ({', '.join(errors)}); {LAUNCH_HINT}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
