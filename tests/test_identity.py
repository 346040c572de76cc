"""Ed25519 identities: key files, signatures, join strings; hivegym-join with a bad join string."""

import os
import stat
import subprocess
import sys

import pytest

from hivegym.protocol.identity import (Identity, IdentityError, decode_key, encode_key, format_join, parse_join,
                                       peer_id, verify)


def test_key_file_is_created_private_and_reloaded(tmp_path):
    path = tmp_path / "coordinator.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.public_key == first.public_key and len(first.public_key) == 32
    assert first.peer_id == peer_id(first.public_key) and len(first.peer_id) == 16


def test_key_file_open_to_others_is_refused(tmp_path):
    path = tmp_path / "k"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(path)


def test_key_file_that_is_not_a_key_is_refused(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM"):
        Identity.load(path)


def test_sign_and_verify():
    a, b = Identity.generate(), Identity.generate()
    signature = a.sign(b"data")
    assert verify(a.public_key, b"data", signature)
    assert not verify(a.public_key, b"datA", signature)
    assert not verify(b.public_key, b"data", signature)
    assert not verify(a.public_key, b"data", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify(a.public_key, b"data", b"short")


def test_join_string_round_trip():
    key = Identity.generate().public_key
    join = format_join("example.org:50051", key)
    assert join == f"example.org:50051#{encode_key(key)}" and len(encode_key(key)) == 43
    target = parse_join(join)
    assert (target.address, target.public_key) == ("example.org:50051", key)
    assert parse_join("127.0.0.1:7").public_key is None
    assert parse_join("[::1]:7").address == "[::1]:7"


@pytest.mark.parametrize("text, words", [
    ("127.0.0.1", "HOST:PORT"), ("host:0", "HOST:PORT"), ("host:99999", "HOST:PORT"), ("a b:1", "HOST:PORT"),
    ("host:1#", "no key"), ("host:1#abc", "43 characters"), ("host:1#" + "A" * 42 + "!", "43 characters"),
])
def test_bad_join_strings_are_refused(text, words):
    with pytest.raises(IdentityError, match=words):
        parse_join(text)


def test_decode_key_refuses_non_keys():
    with pytest.raises(IdentityError):
        decode_key("=" * 43)
    assert decode_key(encode_key(bytes(32))) == bytes(32)  # 32 bytes is the only check a public key can get


def test_launch_refuses_a_key_file_open_to_others(tmp_path):
    key = tmp_path / "coordinator.key"
    Identity.load_or_create(key)
    os.chmod(key, 0o640)
    result = subprocess.run([sys.executable, "-m", "hivegym.coordinator.cli", "--run-dir", str(tmp_path / "run"),
                             "--identity", str(key)], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "chmod 600" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "coordinator.json").exists()


def test_join_accepts_join_string_and_refuses_a_bad_key_in_one_line():
    result = subprocess.run([sys.executable, "-m", "hivegym.peer.cli", "--coordinator", "127.0.0.1:1#nokey"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith("hivegym-join: public key must be 43 characters")
    assert len(result.stderr.splitlines()) == 1
