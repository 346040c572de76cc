"""hivegym-launch: start a training swarm. Heavy modules load only after the arguments parse."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hivegym-launch", description="Launch a hivegym training swarm.")
    parser.add_argument("--config", metavar="FILE", help="run configuration (TOML, flat keys of RunConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set env_id=Acrobot-v1")
    parser.add_argument("--host", default="127.0.0.1", help="interface of the gRPC server (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (default: any free port)")
    parser.add_argument("--advertise-host", default=None,
                        help="address peers use to reach the gRPC server (default: --host)")
    parser.add_argument("--host-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="libp2p listen addresses (default /ip4/127.0.0.1/tcp/0)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR",
                        help="libp2p addresses announced to peers (for a public or NATed address)")
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="interface of the dashboard's HTTP server (default 127.0.0.1: this machine only)")
    parser.add_argument("--dashboard-port", type=int, default=None, metavar="PORT",
                        help="dashboard port (default 8080, or any free port if 8080 is taken; 0: any free port)")
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false", help="serve no dashboard")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default: a fresh one in /tmp)")
    parser.add_argument("--identity", type=Path, default=None, metavar="FILE",
                        help="the coordinator's Ed25519 key, created (mode 0600) if missing; it signs checkpoints "
                             "(default RUN_DIR/coordinator.key)")
    parser.add_argument("--local-peers", type=int, default=0, metavar="N", help="start N peers on this machine")
    parser.add_argument("--target-return", type=float, default=None, metavar="R",
                        help="stop and exit 0 once the evaluation's mean return reaches R")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="exit non-zero if the target is not reached within M minutes")
    parser.add_argument("--reducer-for", metavar="HOST:PORT#KEY", default=None,
                        help="run as an extra trusted reducer of that coordinator (on another host); needs the "
                             "coordinator's own key as --identity, and --host-maddrs/--announce-maddrs that peers "
                             "reach")
    parser.add_argument("--leaderboard", metavar="HOST:PORT", default=None,
                        help="print the ledger of a running coordinator (per peer: steps claimed and verified, "
                             "audits, credits, device-hours, bans) and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.local_peers < 0:
        parser.error("--local-peers must be >= 0")
    if args.dashboard_port is not None and not 0 <= args.dashboard_port < 65536:
        parser.error("--dashboard-port must be 0..65535")
    return args


def leaderboard(address: str) -> int:
    import grpc

    from hivegym.protocol.identity import IdentityError, parse_join
    from hivegym.protocol.rpc import CoordinatorClient, describe_error

    try:
        client = CoordinatorClient(parse_join(address).address, timeout=5.0, retries=2)
    except IdentityError as e:
        print(f"hivegym-launch: {e}", file=sys.stderr)
        return 2
    try:
        reply = client.status()
    except grpc.RpcError as e:
        print(f"hivegym-launch: {address} does not answer ({describe_error(e)})", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"epoch {reply.epoch}, {reply.live_peers} live peers, {reply.env_steps:,} env steps")
    header = ("peer", "id", "device", "claimed", "verified", "passed", "failed", "credits", "device-h", "banned")
    rows = [(p.peer_name, p.peer_id, p.device, f"{p.steps_claimed:,}", f"{p.steps_verified:,}", p.audits_passed,
             p.audits_failed, f"{p.credits:,}", f"{p.device_hours:.3f}", "BANNED" if p.banned else "")
            for p in reply.peers]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def reducer(args: argparse.Namespace) -> int:
    from hivegym.protocol.identity import Identity, IdentityError, parse_join
    from hivegym.protocol.logs import setup_logging

    setup_logging(args.log_level)
    try:
        target = parse_join(args.reducer_for)
        if args.identity is None:
            raise IdentityError("--reducer-for needs the coordinator's key file as --identity")
        identity = Identity.load(args.identity)
    except IdentityError as e:
        print(f"hivegym-launch: {e}", file=sys.stderr)
        return 2
    if target.public_key is not None and target.public_key != identity.public_key:
        print("hivegym-launch: --identity is not the key of the coordinator in --reducer-for", file=sys.stderr)
        return 2
    import grpc
    import torch

    torch.set_num_threads(1)
    from hivegym.coordinator.remote_reducer import run_reducer
    from hivegym.protocol.rpc import describe_error

    try:
        return run_reducer(target.address, identity, args.host_maddrs, args.announce_maddrs, args.max_minutes)
    except grpc.RpcError as e:
        print(f"hivegym-launch: the coordinator refused the reducer ({describe_error(e)})", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.leaderboard:
        return leaderboard(args.leaderboard)
    if args.reducer_for:
        return reducer(args)
    from hivegym.protocol.config import ConfigError, load
    from hivegym.protocol.logs import setup_logging

    setup_logging(args.log_level)
    try:
        config = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"hivegym-launch: config error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix=f"hivegym-{time.strftime('%Y%m%d-%H%M%S')}-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("hivegym").info("run directory %s", run_dir)
    from hivegym.protocol.identity import Identity, IdentityError

    try:
        identity = Identity.load_or_create(args.identity or run_dir / "coordinator.key")
    except IdentityError as e:
        print(f"hivegym-launch: {e}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(1)
    from hivegym.coordinator.launch import Launch, LaunchOptions

    options = LaunchOptions(host=args.host, port=args.port, run_dir=run_dir, local_peers=args.local_peers,
                            target_return=args.target_return, max_minutes=args.max_minutes,
                            host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs, identity=identity,
                            advertise_host=args.advertise_host or args.host, dashboard=args.dashboard,
                            dashboard_host=args.dashboard_host, dashboard_port=args.dashboard_port)
    try:
        result = Launch(config, options).run()
    except RuntimeError as e:
        print(f"hivegym-launch: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    if args.target_return is not None:
        return 0 if result["reached"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
