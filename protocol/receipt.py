"""Signed receipts and access tokens: strict msgpack schemas, signing and decoding.

A receipt says what one batch was: who did it (peer id), at which epoch, which batch index (the seeds derive from
these), what came out (env steps, episode returns, action digests) and sketches of the parameters used and of the
batch's contribution. The peer signs `RECEIPT_PREFIX + msgpack(receipt)` with its Ed25519 key; the coordinator
stores the signed bytes as they came, so a receipt can be checked again later by anyone with the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

from hivegym.protocol.identity import SIGNATURE_BYTES, Identity, verify

RECEIPT_PREFIX = b"hivegym receipt v1\n"
TOKEN_PREFIX = b"hivegym token v1\n"
JOIN_PREFIX = b"hivegym join v1\n"
EPOCH_PREFIX = b"hivegym epoch v1\n"
MAX_RECEIPT_BYTES = 12 * 1024
MAX_LIST = 4096  # no list in a receipt is longer (returns per env, sketch entries, env streams)
PEER_ID = re.compile(r"^[0-9a-f]{16}$")
HASH = re.compile(r"^[0-9a-f]{64}$")
UINT63 = 2**63 - 1


class ReceiptError(ValueError):
    """Bytes that are not a well-formed, correctly signed receipt or token; the message says what is wrong."""


@dataclass(frozen=True)
class Receipt:
    run_id: str
    peer_id: str  # 16 hex digits: protocol.identity.peer_id of the signing key
    epoch: int  # the peer's epoch label when it collected the batch
    batch: int  # index of the batch within (peer, epoch); with the epoch it fixes the seeds
    env_steps: int
    returns: list[list[float]]  # per env stream, returns of the episodes that ended in the batch
    actions: list[bytes]  # per env stream, 16-byte digest of its actions
    params_hash: str  # sha256 of the float32 parameters the batch was collected with
    params_sketch: list[float]  # sketch of those parameters (matches the coordinator's copy within rounding)
    update_sketch: list[float]  # sketch of the batch's contribution (protocol.work.contribution)
    collect_s: float  # seconds spent collecting this batch
    compute_s: float  # seconds spent computing its contribution
    step_s: float  # seconds in the optimizer step after it, averaging included
    average_s: float  # of step_s, in an averaging round
    wall_s: float  # seconds since the peer began training

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    def sign(self, identity: Identity) -> tuple[bytes, bytes]:
        """(receipt bytes, signature)."""
        data = self.encode()
        return data, identity.sign(RECEIPT_PREFIX + data)


TIMING_FIELDS = ("collect_s", "compute_s", "step_s", "average_s", "wall_s")


def decode_receipt(data: bytes) -> Receipt:
    """Parse receipt bytes against the strict schema (no signature check); raises ReceiptError."""
    if len(data) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"receipt is {len(data)} bytes; the limit is {MAX_RECEIPT_BYTES}")
    obj = _unpack(data, "receipt")
    expected = {f.name for f in fields(Receipt)}
    if not isinstance(obj, dict) or set(obj) != expected:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ReceiptError(f"receipt must be a map with exactly the keys {sorted(expected)}, got {keys}")
    _check(isinstance(obj["run_id"], str) and 0 < len(obj["run_id"]) <= 128, "run_id must be a short string")
    _check(isinstance(obj["peer_id"], str) and bool(PEER_ID.fullmatch(obj["peer_id"])), "peer_id must be 16 hex digits")
    for name in ("epoch", "batch", "env_steps"):
        _check(type(obj[name]) is int and 0 <= obj[name] <= UINT63, f"{name} must be an integer >= 0")
    _check(isinstance(obj["params_hash"], str) and bool(HASH.fullmatch(obj["params_hash"])),
           "params_hash must be 64 lowercase hex digits")
    returns = obj["returns"]
    _check(isinstance(returns, list) and len(returns) <= MAX_LIST and all(isinstance(r, list) for r in returns),
           "returns must be a list of lists of numbers")
    for per_env in returns:
        _floats(per_env, "returns")
    actions = obj["actions"]
    _check(isinstance(actions, list) and len(actions) <= MAX_LIST
           and all(isinstance(a, bytes) and len(a) == 16 for a in actions), "actions must be a list of 16-byte digests")
    for name in ("params_sketch", "update_sketch"):
        _floats(obj[name], name)
    for name in TIMING_FIELDS:
        value = obj[name]
        _check(type(value) in (int, float) and math.isfinite(value) and value >= 0, f"{name} must be finite and >= 0")
        obj[name] = float(value)
    return Receipt(**obj)


def verify_receipt(data: bytes, signature: bytes, public_key: bytes) -> Receipt:
    """Decode and check the signature against the sender's key; raises ReceiptError."""
    if len(signature) != SIGNATURE_BYTES or not verify(public_key, RECEIPT_PREFIX + data, signature):
        raise ReceiptError("receipt signature does not verify with this peer's key")
    return decode_receipt(data)


@dataclass(frozen=True)
class Token:
    """Access to one run, signed by the coordinator: who (peer id, its keys), until when (unix seconds)."""

    run_id: str
    peer_id: str
    public_key: bytes  # the peer's Ed25519 key
    libp2p_id: str  # the peer's hivemind (libp2p) peer id, base58; "" before it has one
    expires: float

    def sign(self, identity: Identity) -> tuple[bytes, bytes]:
        data = msgpack.packb(asdict(self), use_bin_type=True)
        return data, identity.sign(TOKEN_PREFIX + data)


def verify_token(data: bytes, signature: bytes, coordinator_key: bytes) -> Token:
    if len(data) > 1024 or not verify(coordinator_key, TOKEN_PREFIX + data, signature):
        raise ReceiptError("token signature does not verify with the coordinator's key")
    obj = _unpack(data, "token")
    expected = {f.name for f in fields(Token)}
    _check(isinstance(obj, dict) and set(obj) == expected, "token has the wrong keys")
    return Token(**obj)


def join_message(coordinator_key: bytes, peer_name: str, libp2p_id: str, timestamp: float) -> bytes:
    """What a peer signs to prove it holds its key: bound to this coordinator, its name and hivemind id, and a time."""
    return JOIN_PREFIX + msgpack.packb([coordinator_key, peer_name, libp2p_id, timestamp], use_bin_type=True)


def epoch_hash_message(run_id: str, epoch: int, params_hash: str) -> bytes:
    """What the coordinator signs about an epoch: the hash of its parameters."""
    return EPOCH_PREFIX + msgpack.packb([run_id, epoch, params_hash])


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True,
                               max_str_len=256, max_bin_len=64, max_array_len=MAX_LIST, max_map_len=32,
                               max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise ReceiptError(f"{what} is not valid msgpack: {type(e).__name__}: {str(e)[:100]}") from None


def _floats(value: Any, name: str) -> None:
    _check(isinstance(value, list) and len(value) <= MAX_LIST
           and all(type(v) in (int, float) and math.isfinite(v) for v in value),
           f"{name} must be a list of finite numbers")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ReceiptError(message)
