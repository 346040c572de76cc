"""Ed25519 identities: key files, signatures, peer ids, and the join string that carries a public key.

A join string is `HOST:PORT#KEY`, KEY being the urlsafe base64 (no padding, 43 characters) of the raw
32-byte Ed25519 public key; the `#KEY` part may be left out where nothing is verified (hivegym-join).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$")


class IdentityError(ValueError):
    """A key file, key or join string that cannot be used; the message says why in one line."""


def encode_key(public_key: bytes) -> str:
    return base64.urlsafe_b64encode(public_key).rstrip(b"=").decode()


def decode_key(text: str) -> bytes:
    """The raw 32-byte public key from its 43-character urlsafe base64 form."""
    if len(text) != 43 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise IdentityError(f"public key must be 43 characters of urlsafe base64, got {text[:60]!r}")
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        raise IdentityError(f"public key {text!r} is not valid base64") from None
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise IdentityError(f"public key {text!r} is not an Ed25519 key") from None
    return raw


def encode_signature(signature: bytes) -> str:
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def decode_signature(text: str) -> bytes | None:
    """The raw signature, or None if `text` is not 64 bytes of urlsafe base64 (it then verifies nothing)."""
    if not isinstance(text, str) or len(text) != 86 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return None
    return base64.urlsafe_b64decode(text + "==")


def peer_id(public_key: bytes) -> str:
    """A short stable name for a key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read a PEM (PKCS#8) key file, or create one readable by its owner only (mode 0600)."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        identity = cls.generate()
        pem = identity.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            mode = os.stat(path).st_mode
            data = Path(path).read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"key file {path} is open to other users (mode {stat.S_IMODE(mode):o}); "
                                f"run: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise IdentityError(f"key file {path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


@dataclass(frozen=True)
class JoinTarget:
    address: str  # HOST:PORT of the coordinator's gRPC server
    public_key: bytes | None  # the coordinator's raw Ed25519 key, if the join string carried one


def format_join(address: str, public_key: bytes) -> str:
    return f"{address}#{encode_key(public_key)}"


def parse_join(text: str) -> JoinTarget:
    """`HOST:PORT` or `HOST:PORT#KEY`; raises IdentityError with a one-line reason."""
    address, sep, key = text.strip().partition("#")
    match = ADDRESS.fullmatch(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise IdentityError(f"coordinator must look like HOST:PORT or HOST:PORT#KEY, got {text[:80]!r}")
    if sep and not key:
        raise IdentityError(f"join string {text[:80]!r} has '#' but no key after it")
    return JoinTarget(address, decode_key(key) if sep else None)
