"""Checkpoint packages: a weights file plus a JSON manifest signed by the coordinator.

The signed bytes are SIGNING_CONTEXT followed by the manifest without its "signature" field as canonical
JSON: json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False), UTF-8.
"signature" is the urlsafe base64 (no padding) of the 64-byte Ed25519 signature over those bytes.

In a run directory a package is `NAME.json` plus `NAME.<first 16 hex digits of sha256>.pt`, so a reader
that opened the manifest always finds the weights it names, even while a better package replaces it.
Pulled and played packages are `NAME.json` plus `NAME.pt`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from hivegym.protocol.identity import Identity, decode_signature, encode_key, encode_signature, verify

FORMAT = "hivegym-checkpoint/1"
SIGNING_CONTEXT = b"hivegym checkpoint manifest v1\n"  # a signature over a manifest can mean nothing else
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")  # no '/' and no leading '.': never leaves the folder
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 64 * 1024
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024
REQUIRED = {"format": str, "name": str, "role": str, "size": str, "env_id": str, "architecture": dict,
            "params": int, "weights": dict, "signature": str}


class CheckpointError(ValueError):
    """A package that must not be used; the message says why in one line."""


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise CheckpointError(f"checkpoint name must be 1-80 characters of A-Z a-z 0-9 _ . - (not starting "
                              f"with '.'), got {name[:90]!r}")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return SIGNING_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                        allow_nan=False).encode()


def sign_manifest(manifest: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """The manifest with "signer" and "signature" set."""
    signed = {**manifest, "format": FORMAT,
              "signer": {"algorithm": "ed25519", "public_key": encode_key(identity.public_key),
                         "peer_id": identity.peer_id}}
    signed.pop("signature", None)
    return {**signed, "signature": encode_signature(identity.sign(signed_bytes(signed)))}


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Decode untrusted manifest bytes and check their shape (not their signature)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError("manifest must be a JSON object")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CheckpointError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"manifest format {manifest['format'][:40]!r} is not {FORMAT}; upgrade hivegym")
    check_name(manifest["name"])
    weights = manifest["weights"]
    if not isinstance(weights.get("sha256"), str) or not SHA256.fullmatch(weights["sha256"]):
        raise CheckpointError("manifest field weights.sha256 must be 64 lowercase hex digits")
    size = weights.get("bytes")
    if type(size) is not int or not 0 < size <= MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"manifest field weights.bytes must be 1..{MAX_WEIGHTS_BYTES}")
    return manifest


def verify_signature(manifest: dict[str, Any], public_key: bytes) -> None:
    signature = decode_signature(manifest.get("signature"))
    try:
        data = signed_bytes(manifest)
    except ValueError:  # NaN or infinity cannot be canonical JSON
        data = b""
    if signature is None or not verify(public_key, data, signature):
        raise CheckpointError(f"checkpoint {manifest.get('name')!r} is not signed by the coordinator key "
                              f"{encode_key(public_key)}")


def verify_weights(manifest: dict[str, Any], path: Path) -> None:
    size, expected = os.path.getsize(path), manifest["weights"]["bytes"]
    if size != expected:
        raise CheckpointError(f"weights of {manifest['name']!r} are {size} bytes; the manifest says {expected}")
    digest = sha256_file(path)
    if digest != manifest["weights"]["sha256"]:
        raise CheckpointError(f"sha256 of the weights of {manifest['name']!r} is {digest}; the manifest says "
                              f"{manifest['weights']['sha256']} (the file was altered)")


def weights_name(name: str, sha256: str) -> str:
    """The weights file of a package in a run directory."""
    return f"{name}.{sha256[:16]}.pt"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(directory: Path, manifest: dict[str, Any], weights: bytes, identity: Identity) -> dict[str, Any]:
    """Write weights, then the signed manifest (each atomically), then drop the package's older weights."""
    name = check_name(manifest["name"])
    digest = sha256_bytes(weights)
    signed = sign_manifest({**manifest, "weights": {"sha256": digest, "bytes": len(weights)}}, identity)
    directory.mkdir(parents=True, exist_ok=True)
    current = weights_name(name, digest)
    _write_atomic(directory / current, weights)
    _write_atomic(directory / f"{name}.json", json.dumps(signed, indent=2).encode())
    for old in directory.glob(f"{name}.*.pt"):
        if old.name != current and re.fullmatch(re.escape(name) + r"\.[0-9a-f]{16}\.pt", old.name):
            old.unlink(missing_ok=True)
    return signed


def save_pulled(directory: Path, manifest_bytes: bytes, weights_tmp: Path) -> Path:
    """Move verified weights into place as NAME.pt next to NAME.json; returns the manifest's path."""
    name = check_name(json.loads(manifest_bytes)["name"])
    os.replace(weights_tmp, directory / f"{name}.pt")
    _write_atomic(directory / f"{name}.json", manifest_bytes)  # last: a manifest means a complete package
    return directory / f"{name}.json"
