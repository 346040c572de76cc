"""hivegym-pull's parts: list and download a coordinator's signed checkpoints (the command is in cli.py).

    hivegym-pull --coordinator HOST:PORT#KEY --list
    hivegym-pull --coordinator HOST:PORT#KEY --size tiny -o policies/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


class PullError(Exception):
    """Ends the program with a one-line message and exit status 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hivegym-pull", description="List and download signed checkpoints "
                                     "from a hivegym coordinator, checking hash and signature.")
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT#KEY",
                        help="the join string hivegym-launch prints (it carries the coordinator's public key)")
    parser.add_argument("name", nargs="?", help="checkpoint to download, as --list shows it")
    parser.add_argument("--list", action="store_true", help="print the coordinator's checkpoints as a table")
    parser.add_argument("--size", help="download the checkpoint of this size (e.g. tiny, small, teacher)")
    parser.add_argument("--best", action="store_true",
                        help="download the checkpoint with the highest mean return (the smallest on ties)")
    parser.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR", help="where to save it")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    parser.add_argument("--retries", type=int, default=3, help="attempts per call, or without progress (default 3)")
    args = parser.parse_args(argv)
    if sum([args.list, args.name is not None, args.size is not None, args.best]) != 1:
        parser.error("give exactly one of NAME, --size, --best or --list")
    if args.timeout <= 0 or args.retries < 1:
        parser.error("--timeout must be > 0 and --retries >= 1")
    return args


def verified_entries(reply, public_key: bytes) -> list[tuple[dict | None, str]]:
    """(manifest or None, error) for every listed package; None when it fails parsing or the signature."""
    from hivegym.protocol.checkpoint import CheckpointError, parse_manifest, verify_signature

    out = []
    for entry in reply.checkpoints:
        try:
            manifest = parse_manifest(entry.manifest_json.encode())
            verify_signature(manifest, public_key)
            if manifest["name"] != entry.name:
                raise CheckpointError(f"listed as {entry.name!r} but its manifest names {manifest['name']!r}")
            out.append((manifest, ""))
        except CheckpointError as e:
            out.append((None, f"{entry.name[:80]}: {e}"))
    return out


def table(manifests: list[dict]) -> str:
    rows = [("name", "role", "params", "of teacher", "mean return", "share", "teacher epoch")]
    for m in sorted(manifests, key=lambda m: m["params"]):
        ev = m.get("evaluation", {})
        share = ev.get("return_share")
        rows.append((m["name"], m["role"], str(m["params"]), f"{100 * m.get('param_share', 1.0):.1f}%",
                     f"{ev.get('mean_return', float('nan')):.1f}",
                     "-" if share is None else f"{100 * share:.1f}%", str(m.get("teacher", {}).get("epoch", "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def choose(entries: list[tuple[dict | None, str]], args: argparse.Namespace) -> dict:
    manifests = [m for m, _ in entries if m is not None]
    if args.name is not None:
        refused = [error for m, error in entries if m is None and error.startswith(f"{args.name}: ")]
        if refused:
            raise PullError(f"refused {refused[0]}; nothing was saved")
        found = [m for m in manifests if m["name"] == args.name]
    elif args.size is not None:
        found = [m for m in manifests if m["size"] == args.size]
    else:
        found = sorted(manifests, key=lambda m: (-m["evaluation"]["mean_return"], m["params"]))[:1]
    if not found:
        what = repr(args.name) if args.name is not None else f"size {args.size!r}"
        raise PullError(f"the coordinator has no signed checkpoint {what}; try --list")
    return found[0]


def download(client, manifest: dict, part: Path, retries: int, on_progress=lambda done, final=False: None) -> bytes:
    """Stream the weights into `part`, resuming from its size after a failure; returns the manifest bytes the
    coordinator sent with them (verified by the caller, with the file). on_progress(bytes so far, final)."""
    import grpc

    from hivegym.protocol.rpc import describe_error

    name, sha, total = manifest["name"], manifest["weights"]["sha256"], manifest["weights"]["bytes"]
    failures, manifest_bytes = 0, None
    with open(part, "ab") as out:
        while True:
            start = offset = out.tell()
            try:
                for chunk in client.download_checkpoint(name, offset, sha):
                    if chunk.manifest_json:
                        manifest_bytes = chunk.manifest_json.encode()
                    if chunk.total_bytes != total:
                        raise PullError(f"the coordinator offers {chunk.total_bytes} bytes of weights for {name!r}; "
                                        f"its manifest says {total} (a truncated or altered file); nothing was saved")
                    if chunk.offset != offset or offset + len(chunk.data) > total:
                        raise PullError(f"the coordinator sent bytes from {chunk.offset} where {offset} was expected, "
                                        f"or past the end; nothing was saved")
                    out.write(chunk.data)
                    offset += len(chunk.data)
                    on_progress(offset)
                if offset == total:
                    break
                error = f"the download ended at {offset} of {total} bytes (truncated)"
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise PullError(f"cannot download {name!r}: {describe_error(e)}") from None
                error = f"{describe_error(e)} at {offset} of {total} bytes"
            failures = 0 if offset > start else failures + 1  # bounded: each retry must make progress
            if failures >= retries:
                raise PullError(f"cannot download {name!r}: {error}; gave up after {failures} attempts")
            time.sleep(min(0.5 * 2 ** failures, 5.0))
    on_progress(offset, final=True)
    return manifest_bytes or b""


def connect(args: argparse.Namespace):
    """(the coordinator's public key, a client) from the join string; raises PullError."""
    from hivegym.protocol.identity import IdentityError, parse_join
    from hivegym.protocol.rpc import CoordinatorClient

    try:
        target = parse_join(args.coordinator)
    except IdentityError as e:
        raise PullError(str(e)) from None
    if target.public_key is None:
        raise PullError("the coordinator's key is missing: use the join string HOST:PORT#KEY that hivegym-launch "
                        "prints (or the 'join' of its coordinator.json)")
    return target.public_key, CoordinatorClient(target.address, args.timeout, args.retries)


def list_entries(client, public_key: bytes) -> list[tuple[dict | None, str]]:
    import grpc

    from hivegym.protocol.rpc import describe_error

    try:
        return verified_entries(client.list_checkpoints(), public_key)
    except grpc.RpcError as e:
        raise PullError(f"cannot list the checkpoints of {client.address}: {describe_error(e)}") from None


def fetch(client, chosen: dict, public_key: bytes, output: Path, retries: int,
          on_progress=lambda done, final=False: None) -> Path:
    """Download a listed checkpoint into `output`, verify hash and signature, save it; returns the manifest's
    path. Raises PullError, leaving nothing behind."""
    from hivegym.protocol.checkpoint import (CheckpointError, parse_manifest, save_pulled, verify_signature,
                                             verify_weights)

    output.mkdir(parents=True, exist_ok=True)
    part = output / f".{chosen['name']}.pt.part"
    part.unlink(missing_ok=True)
    try:
        sent = download(client, chosen, part, retries, on_progress)
        manifest = parse_manifest(sent)
        verify_signature(manifest, public_key)
        if manifest["name"] != chosen["name"]:
            raise CheckpointError(f"asked for {chosen['name']!r}, got a manifest for {manifest['name']!r}")
        verify_weights(manifest, part)
        return save_pulled(output, sent, part)
    except CheckpointError as e:
        raise PullError(f"refused {chosen['name']!r}: {e}; nothing was saved") from None
    finally:
        part.unlink(missing_ok=True)
