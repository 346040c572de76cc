"""docs/PROTOCOL.md's checkpoint signature test vector is what protocol/checkpoint.py computes."""

import hashlib
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivegym.protocol.checkpoint import sign_manifest, signed_bytes, verify_signature
from hivegym.protocol.identity import Identity, decode_key, encode_key

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()


def test_signature_test_vector():
    identity = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    manifest = {"name": "demo-tiny", "role": "student", "size": "tiny", "env_id": "CartPole-v1",
                "architecture": {"kind": "mlp", "hidden": [3, 3]}, "params": 35,
                "evaluation": {"mean_return": 500.0, "return_share": 1.0},
                "weights": {"sha256": hashlib.sha256(b"weights").hexdigest(), "bytes": 7}}
    signed = sign_manifest(manifest, identity)
    key = re.search(r"public key \(join string form\): (\S+)", DOC).group(1)
    body = re.search(r"signed bytes:\n    (hivegym checkpoint manifest v1)\n    (\{.*\})\n", DOC)
    signature = re.search(r"signature: (\S{86})\n", DOC).group(1)
    assert key == encode_key(identity.public_key)
    assert signed_bytes(signed) == f"{body.group(1)}\n{body.group(2)}".encode()
    assert signed["signature"] == signature
    verify_signature(signed, decode_key(key))
