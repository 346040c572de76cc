"""hivegym-join: join a swarm as a compute peer. Heavy modules load only after the arguments parse."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hivegym-join", description="Join a hivegym swarm as a compute peer.")
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT[#KEY]",
                        help="the coordinator's gRPC address, or the join string hivegym-launch prints")
    parser.add_argument("--identity", type=Path, default=None, metavar="FILE",
                        help="this peer's Ed25519 key, created (mode 0600) if missing; its hash is the peer id "
                             "(default: $XDG_CONFIG_HOME/hivegym/peer.key, i.e. ~/.config/hivegym/peer.key)")
    parser.add_argument("--name", default=None, help="this peer's name (default: hostname plus a random suffix)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where gradients are computed (default: the best one found)")
    parser.add_argument("--client-mode", dest="client_mode", action="store_true", default=True,
                        help="open no port and never reduce: works behind NAT and firewalls (the default)")
    parser.add_argument("--no-client-mode", dest="client_mode", action="store_false",
                        help="accept incoming connections (only for peers with a reachable address)")
    parser.add_argument("--host-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="libp2p listen addresses (default /ip4/127.0.0.1/tcp/0)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="libp2p addresses announced to others (a public address in front of this host)")
    parser.add_argument("--auto-relay", action="store_true",
                        help="behind NAT without --client-mode: be reachable through a relay (the bootstrap peers)")
    parser.add_argument("--no-relay", dest="use_relay", action="store_false",
                        help="never dial peers through circuit relays")
    parser.add_argument("--max-minutes", type=float, default=None, help="leave the swarm after this many minutes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small networks run fastest single-threaded)")
    parser.add_argument("--save-params", metavar="FILE", default=None,
                        help="write {epoch: parameters} at the start and right after each of the last 3 global "
                             "steps")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def default_name() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:40] or "peer"
    return f"{host}-{secrets.token_hex(3)}"


def default_identity() -> Path:
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = config_home / "hivegym" / "peer.key"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hivegym.protocol.identity import IdentityError, parse_join
    from hivegym.protocol.logs import setup_logging

    try:
        target = parse_join(args.coordinator)
    except IdentityError as e:
        print(f"hivegym-join: {e}", file=sys.stderr)
        return 2

    setup_logging(args.log_level)
    import torch

    torch.set_num_threads(args.threads)
    from hivegym.peer.volunteer import JoinFailed, VolunteerOptions, run

    options = VolunteerOptions(coordinator=target.address, coordinator_key=target.public_key,
                               identity=args.identity or default_identity(), name=args.name or default_name(),
                               device=args.device,
                               client_mode=args.client_mode, max_minutes=args.max_minutes,
                               live_status=sys.stderr.isatty(), save_params=args.save_params,
                               host_maddrs=tuple(args.host_maddrs), announce_maddrs=tuple(args.announce_maddrs),
                               use_relay=args.use_relay, auto_relay=args.auto_relay)
    try:
        return run(options)
    except JoinFailed as e:
        for line in str(e).splitlines():  # one line per failed check
            print(f"hivegym-join: {' '.join(line.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
