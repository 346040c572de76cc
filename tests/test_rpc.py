"""The coordinator's real gRPC server (real verifier, real SQLite ledger), in-process, over a real channel on
127.0.0.1: raw-bytes requests, every refusal's status code, and that a refused receipt stores nothing."""

from __future__ import annotations

import dataclasses
import math
import socket
import sqlite3
import threading
import time
from concurrent import futures

import grpc
import msgpack
import pytest
import torch
from google.protobuf import any_pb2, wrappers_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hivegym.coordinator.server import PeerRecord, _handler
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity, verify
from hivegym.protocol.receipt import MAX_RECEIPT_BYTES, RECEIPT_PREFIX, Receipt, epoch_hash_message, verify_token
from hivegym.protocol.rpc import (MAX_REQUEST_BYTES, MAX_TRANSPORT_BYTES, PROTOCOL_VERSION, REQUEST_TYPES, SERVICE,
                                  STREAMING, CoordinatorClient, describe_error)
from hivegym.protocol.work import params_hash
from servers import SMALL, TestServer

MADDRS = ["/ip4/127.0.0.1/tcp/1/p2p/x"]
LIBP2P_ID = "12D3KooWGyU75bZS5iyzoCra23zBKMe3dbToFU2xLQSixMpr9vaM"
STEPS = SMALL.rollout_size  # env steps in one receipt
Code = grpc.StatusCode
INVALID = Code.INVALID_ARGUMENT


class Coordinator(TestServer):
    """A running TestServer plus a raw channel whose calls send and receive bytes."""

    __test__ = False

    def __init__(self, tmp_path, config: RunConfig = SMALL, **kwargs):
        super().__init__(tmp_path, config, maddrs=MADDRS, **kwargs)
        self.ledger_path = tmp_path / "ledger.sqlite"
        self.channel = grpc.insecure_channel(self.address)

    def raw(self, method: str, data: bytes) -> bytes | list[bytes]:
        if method in STREAMING:
            return list(self.channel.unary_stream(f"/{SERVICE}/{method}")(data, timeout=10))
        return self.channel.unary_unary(f"/{SERVICE}/{method}")(data, timeout=10)

    def join(self, identity: Identity, name: str = "peer-1", device: str = "cpu", version: int = PROTOCOL_VERSION,
             credentials: pb.Credentials | None = None) -> pb.JoinReply:
        credentials = credentials or self.credentials(identity, name)
        request = pb.JoinRequest(protocol_version=version, peer_name=name, device=device, credentials=credentials)
        return pb.JoinReply.FromString(self.raw("Join", request.SerializeToString()))

    def renew(self, identity: Identity, name: str = "peer-1", credentials: pb.Credentials | None = None
              ) -> pb.TokenReply:
        credentials = credentials or self.credentials(identity, name, LIBP2P_ID)
        request = pb.RenewTokenRequest(peer_name=name, credentials=credentials)
        return pb.TokenReply.FromString(self.raw("RenewToken", request.SerializeToString()))

    def submit(self, data: bytes, signature: bytes) -> pb.SubmitReceiptReply:
        request = pb.SubmitReceiptRequest(receipt=data, signature=signature)
        return pb.SubmitReceiptReply.FromString(self.raw("SubmitReceipt", request.SerializeToString()))

    def submit_receipt(self, identity: Identity, receipt: Receipt) -> pb.SubmitReceiptReply:
        return self.submit(*receipt.sign(identity))

    def status(self) -> pb.StatusReply:
        return pb.StatusReply.FromString(self.raw("Status", b""))

    def stored(self) -> int:
        """Receipts in the ledger, counted over a connection of our own."""
        with sqlite3.connect(self.ledger_path) as db:
            return db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def peers(self) -> int:
        with sqlite3.connect(self.ledger_path) as db:
            return db.execute("SELECT COUNT(*) FROM peers").fetchone()[0]

    def close(self):
        self.channel.close()
        super().close()


@pytest.fixture
def coord(tmp_path):
    coordinator = Coordinator(tmp_path)
    yield coordinator
    coordinator.close()


@pytest.fixture
def make(tmp_path):
    """Coordinators with other configs."""
    made = []

    def start(**changes) -> Coordinator:
        made.append(Coordinator(tmp_path, dataclasses.replace(SMALL, **changes)))
        return made[-1]

    yield start
    for coordinator in made:
        coordinator.close()


@pytest.fixture
def peer(coord) -> Identity:
    """A peer that has joined `coord` as peer-1."""
    identity = Identity.generate()
    coord.join(identity)
    return identity


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.details(), "every refusal must say why"
    return info.value


def refused(code: grpc.StatusCode, fn, *args, words: str = "") -> grpc.RpcError:
    e = rpc_error(fn, *args)
    assert e.code() == code, (e.code(), e.details())
    assert words in e.details(), e.details()
    return e


def raw_receipt(identity: Identity, receipt: Receipt, **fields) -> tuple[bytes, bytes]:
    """A receipt map with any field values (NaN, negative numbers, wrong types), msgpack-encoded and correctly
    signed: only the coordinator's schema stands between it and the ledger."""
    obj = {**dataclasses.asdict(receipt), **fields}
    data = msgpack.packb(obj, use_bin_type=True)
    return data, identity.sign(RECEIPT_PREFIX + data)


# ---- Join, RenewToken, Status -----------------------------------------------------------------------------------

def test_join_returns_config_bootstrap_addresses_and_a_signed_token(coord):
    identity = Identity.generate()
    reply = coord.join(identity, "peer-1", "cuda")
    assert RunConfig.from_json(reply.run_config_json) == SMALL
    assert list(reply.bootstrap_maddrs) == MADDRS
    token = verify_token(reply.token.token, reply.token.token_signature, coord.identity.public_key)
    assert (token.run_id, token.peer_id, token.public_key, token.libp2p_id) == (
        SMALL.run_id, identity.peer_id, identity.public_key, "")
    assert 0 < token.expires - time.time() <= SMALL.token_ttl
    assert coord.ledger.peer(identity.peer_id)["name"] == "peer-1"
    assert coord.state.peers[identity.peer_id].name == "peer-1"  # SwarmState is keyed by peer id


def test_renew_binds_the_libp2p_id_and_publishes_access(coord, peer):
    reply = coord.renew(peer)
    token = verify_token(reply.token, reply.token_signature, coord.identity.public_key)
    assert (token.peer_id, token.libp2p_id) == (peer.peer_id, LIBP2P_ID)
    assert coord.ledger.peer(peer.peer_id)["libp2p_id"] == LIBP2P_ID
    ((kind, (libp2p_id, expires)),) = coord.published
    assert (kind, libp2p_id) == ("access", LIBP2P_ID) and expires == pytest.approx(token.expires, abs=1.0)


def test_renew_before_join_is_failed_precondition(coord):
    refused(Code.FAILED_PRECONDITION, coord.renew, Identity.generate(), words="Join")
    assert coord.peers() == 0 and coord.published == []


def test_only_the_coordinators_key_registers_a_reducer(coord):
    def register(identity: Identity, maddr: str) -> pb.RegisterReducerReply:
        request = pb.RegisterReducerRequest(credentials=coord.credentials(identity, "reducer", LIBP2P_ID),
                                            maddrs=[maddr])
        return pb.RegisterReducerReply.FromString(coord.raw("RegisterReducer", request.SerializeToString()))

    maddr = f"/ip4/10.0.0.2/tcp/31338/p2p/{LIBP2P_ID}"
    refused(Code.PERMISSION_DENIED, register, Identity.generate(), maddr, words="coordinator's own key")
    assert coord.published == [] and maddr not in coord.state.bootstrap_maddrs
    reply = register(coord.identity, maddr)
    assert list(reply.bootstrap_maddrs) == MADDRS and reply.run_config_json == SMALL.to_json()
    assert [kind for kind, _ in coord.published] == ["access"] and coord.published[0][1][0] == LIBP2P_ID
    assert coord.state.bootstrap_maddrs == [*MADDRS, maddr]  # later volunteers follow it too
    no_id = pb.RegisterReducerRequest(credentials=coord.credentials(coord.identity, "reducer"), maddrs=["/ip4/x"])
    refused(INVALID, coord.raw, "RegisterReducer", no_id.SerializeToString(), words="/p2p/")


def test_status_sums_receipts_and_live_peers(coord):
    status = coord.status()
    assert (status.live_peers, status.env_steps, status.has_eval, list(status.peers)) == (0, 0, False, [])
    assert status.coordinator_key == coord.identity.public_key
    alice, bob = Identity.generate(), Identity.generate()
    coord.join(alice, "alice")
    coord.join(bob, "bob", "cuda")
    for batch in range(2):
        coord.submit_receipt(alice, coord.receipt(alice, batch=batch))
    coord.submit_receipt(bob, coord.receipt(bob))
    status = coord.status()
    assert status.live_peers == 2
    assert status.env_steps == 3 * STEPS
    # samples (env steps x update epochs) per second of wall_s (1.0 in the test receipts), summed over live peers
    assert status.samples_per_second == pytest.approx(3 * STEPS * SMALL.update_epochs)
    assert status.uptime_s >= 0
    board = {row.peer_name: row for row in status.peers}
    assert (board["alice"].peer_id, board["alice"].steps_claimed, board["alice"].device) == (
        alice.peer_id, 2 * STEPS, "cpu")
    assert (board["bob"].steps_claimed, board["bob"].device, board["bob"].credits) == (STEPS, "cuda", 0)


def test_submit_reply_carries_the_coordinator_epoch(coord, peer):
    with coord.state.lock:
        coord.state.epoch = 5
    assert coord.submit_receipt(peer, coord.receipt(peer)).epoch == 5


def test_huge_counters_do_not_break_status(coord):
    now = time.monotonic()
    with coord.state.lock:
        for pid in ("a" * 16, "b" * 16):
            coord.state.peers[pid] = PeerRecord(pid, "cpu", now, now, env_steps=2**63)
    assert coord.status().env_steps == 2**64 - 1  # saturates instead of failing every Status call


def test_rejoin_keeps_env_steps_counted(coord, peer):
    coord.submit_receipt(peer, coord.receipt(peer, batch=0))
    coord.join(peer)  # a restarted peer (same key) counts from zero again
    assert coord.state.peers[peer.peer_id].env_steps == 0
    coord.submit_receipt(peer, coord.receipt(peer, batch=1))
    status = coord.status()
    assert (status.env_steps, status.live_peers, coord.stored()) == (2 * STEPS, 1, 2)


# ---- malformed requests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0f", b"\x12\x05ab", b"\x00"])
def test_garbage_bytes_are_invalid_argument(coord, method, data):
    e = refused(INVALID, coord.raw, method, data, words="not a valid")
    assert REQUEST_TYPES[method].__name__ in e.details()


def test_message_of_the_wrong_type_is_invalid_argument(coord):
    # An Any's field 2 is bytes; a JoinRequest's field 2 is a string, which must be UTF-8
    wrong = any_pb2.Any(type_url="x", value=b"\xff\xfe").SerializeToString()
    refused(INVALID, coord.raw, "Join", wrong, words="not a valid JoinRequest")
    # the same for a RenewTokenRequest's field 1 (peer_name)
    wrong = wrappers_pb2.BytesValue(value=b"\x80").SerializeToString()
    refused(INVALID, coord.raw, "RenewToken", wrong, words="not a valid RenewTokenRequest")
    # a StatusReply parses as a JoinRequest (mismatched wire types become unknown fields), but it is refused
    status = pb.StatusReply(epoch=3, live_peers=2, samples_per_second=1.5, env_steps=9).SerializeToString()
    refused(INVALID, coord.raw, "Join", status)
    assert coord.peers() == 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
def test_oversized_requests(coord, method):
    unknown_field = b"\xfa\x3f"  # field 1023, length-delimited: parses, and only its size is wrong
    big = unknown_field + _varint(MAX_REQUEST_BYTES) + b"x" * MAX_REQUEST_BYTES
    assert MAX_REQUEST_BYTES < len(big) < MAX_TRANSPORT_BYTES
    refused(INVALID, coord.raw, method, big, words=str(MAX_REQUEST_BYTES))
    huge = b"\x00" * (MAX_TRANSPORT_BYTES + 1)
    assert rpc_error(coord.raw, method, huge).code() == Code.RESOURCE_EXHAUSTED
    assert coord.status().live_peers == 0


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/no", "ünï", "a\nb"])
def test_bad_peer_name_is_invalid(coord, name):
    identity = Identity.generate()
    refused(INVALID, coord.join, identity, name, words="peer_name")
    refused(INVALID, coord.renew, identity, name, words="peer_name")
    assert coord.peers() == 0


def test_bad_join_fields_are_invalid(coord):
    identity = Identity.generate()
    good = coord.credentials(identity, "peer-1")
    refused(INVALID, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION + 1, words="protocol_version")
    refused(INVALID, coord.join, identity, "peer-1", "cpu", 0, words="protocol_version")
    refused(INVALID, coord.join, identity, "peer-1", "tpu", words="device")
    for changes, words in [({"public_key": b"k" * 31}, "public_key"), ({"public_key": b""}, "public_key"),
                           ({"signature": b"s" * 63}, "signature"), ({"libp2p_id": "not base58 0OIl"}, "libp2p_id"),
                           ({"timestamp": math.nan}, "timestamp"), ({"timestamp": math.inf}, "timestamp")]:
        credentials = pb.Credentials()
        credentials.CopyFrom(good)
        for key, value in changes.items():
            setattr(credentials, key, value)
        refused(INVALID, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, credentials, words=words)
    refused(INVALID, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, pb.Credentials())
    # RenewToken needs the hivemind peer id it binds the token to
    refused(INVALID, coord.renew, identity, "peer-1", coord.credentials(identity, "peer-1"), words="libp2p_id")
    assert coord.peers() == 0 and coord.status().live_peers == 0


def test_bad_submit_requests_are_invalid(coord, peer):
    data, signature = coord.receipt(peer).sign(peer)
    refused(INVALID, coord.submit, b"", signature, words="receipt is empty")
    refused(INVALID, coord.submit, data, signature[:-1], words="signature must be 64 bytes")
    refused(INVALID, coord.submit, data, b"", words="signature must be 64 bytes")
    assert coord.stored() == 0


def test_server_survives_abuse(coord):
    for method in REQUEST_TYPES:
        for data in (b"\xff" * 10, b"\x00" * (MAX_REQUEST_BYTES + 1)):
            with pytest.raises(grpc.RpcError):
                coord.raw(method, data)
    identity = Identity.generate()
    with pytest.raises(grpc.RpcError):
        coord.join(identity, name="bad name")
    with pytest.raises(grpc.RpcError):
        coord.submit_receipt(identity, coord.receipt(identity))  # never joined
    coord.join(identity, "ok")
    coord.submit_receipt(identity, coord.receipt(identity))
    status = coord.status()
    assert (status.live_peers, status.env_steps, coord.stored()) == (1, STEPS, 1)


def test_reflection_lists_the_service(coord):
    stub = reflection_pb2_grpc.ServerReflectionStub(coord.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names


# ---- the verifier's rules: each refusal has its code and stores nothing -----------------------------------------

def test_receipt_with_a_bad_signature_is_unauthenticated(coord, peer):
    receipt = coord.receipt(peer)
    data, signature = receipt.sign(Identity.generate())  # signed by another key
    refused(Code.UNAUTHENTICATED, coord.submit, data, signature, words="signature")
    data, signature = receipt.sign(peer)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    refused(Code.UNAUTHENTICATED, coord.submit, data, flipped, words="signature")
    altered = receipt.encode().replace(b"\xa5batch\x00", b"\xa5batch\x01")  # signed as batch 0, sent as batch 1
    assert altered != data
    refused(Code.UNAUTHENTICATED, coord.submit, altered, signature, words="signature")
    assert coord.stored() == 0 and coord.status().env_steps == 0


def test_receipt_of_an_unknown_peer_is_unauthenticated(coord):
    stranger = Identity.generate()
    refused(Code.UNAUTHENTICATED, coord.submit_receipt, stranger, coord.receipt(stranger), words="Join first")
    assert coord.stored() == 0 and coord.peers() == 0


def test_receipt_of_a_banned_peer_is_permission_denied(coord, peer):
    coord.ledger.ban(peer.peer_id, "failed audits")
    refused(Code.PERMISSION_DENIED, coord.submit_receipt, peer, coord.receipt(peer), words="banned")
    assert coord.stored() == 0 and coord.status().env_steps == 0


def test_duplicate_receipt_is_already_exists(coord, peer):
    receipt = coord.receipt(peer)
    coord.submit_receipt(peer, receipt)
    refused(Code.ALREADY_EXISTS, coord.submit_receipt, peer, receipt)
    # the same (epoch, batch) again with other contents, correctly signed: still one receipt per batch
    refused(Code.ALREADY_EXISTS, coord.submit_receipt, peer, dataclasses.replace(receipt, wall_s=2.0))
    assert coord.stored() == 1 and coord.status().env_steps == STEPS


def test_receipt_from_a_future_epoch_is_out_of_range(coord, peer):
    refused(Code.OUT_OF_RANGE, coord.submit_receipt, peer, coord.receipt(peer, epoch=2), words="future")
    assert coord.stored() == 0
    coord.submit_receipt(peer, coord.receipt(peer, epoch=1))  # one ahead: a peer whose round ended first
    coord.verifier.set_epoch(5)
    refused(Code.OUT_OF_RANGE, coord.submit_receipt, peer, coord.receipt(peer, epoch=7), words="future")
    assert coord.stored() == 1


def test_receipt_from_too_old_an_epoch_is_out_of_range(coord, peer):
    coord.verifier.set_epoch(SMALL.params_history + 1)
    refused(Code.OUT_OF_RANGE, coord.submit_receipt, peer, coord.receipt(peer, epoch=0), words="too old")
    assert coord.stored() == 0
    coord.submit_receipt(peer, coord.receipt(peer, epoch=1))  # the oldest epoch still kept


@pytest.mark.parametrize("fields, words", [
    ({"returns": [[math.nan], []]}, "returns"),
    ({"returns": [[1.0, math.inf], []]}, "returns"),
    ({"params_sketch": [math.nan] * SMALL.sketch_dim}, "params_sketch"),
    ({"update_sketch": [-math.inf] * SMALL.sketch_dim}, "update_sketch"),
    ({"collect_s": math.nan}, "collect_s"),
    ({"wall_s": math.inf}, "wall_s"),
    ({"compute_s": -0.5}, "compute_s"),
    ({"epoch": -1}, "epoch"),
    ({"batch": -1}, "batch"),
    ({"env_steps": -STEPS}, "env_steps"),
    ({"env_steps": float(STEPS)}, "env_steps"),
    ({"epoch": True}, "epoch"),
    ({"peer_id": "not hex"}, "peer_id"),
    ({"params_hash": "ab"}, "params_hash"),
    ({"actions": [b"short", b"x" * 16]}, "actions"),
    ({"returns": "nope"}, "returns"),
])
def test_non_finite_negative_or_mistyped_fields_are_invalid(coord, peer, fields, words):
    receipt = coord.receipt(peer)
    refused(INVALID, coord.submit, *raw_receipt(peer, receipt, **fields), words=words)
    assert coord.stored() == 0 and coord.status().env_steps == 0


def test_receipts_that_are_not_receipt_maps_are_invalid(coord, peer):
    receipt = coord.receipt(peer)
    fields = dataclasses.asdict(receipt)
    for obj in ([1, 2], "text", {**fields, "extra": 1}, {k: v for k, v in fields.items() if k != "wall_s"}):
        data = msgpack.packb(obj, use_bin_type=True)
        refused(INVALID, coord.submit, data, peer.sign(RECEIPT_PREFIX + data), words="receipt")
    data = receipt.encode() + b"\x00"  # trailing bytes
    refused(INVALID, coord.submit, data, peer.sign(RECEIPT_PREFIX + data), words="msgpack")
    assert coord.stored() == 0


@pytest.mark.parametrize("changes, words", [
    (lambda c: {"env_steps": STEPS - 1}, "env_steps must be"),
    (lambda c: {"env_steps": 2 * STEPS}, "env_steps must be"),
    (lambda c: {"returns": c.returns[:1]}, "env streams"),
    (lambda c: {"actions": c.actions * 2}, "env streams"),
    (lambda c: {"returns": [[1.0] * (SMALL.rollout_steps + 1), []]}, "more episodes"),
    (lambda c: {"params_sketch": c.params_sketch[:-1]}, "sketches"),
    (lambda c: {"update_sketch": c.update_sketch + [0.0]}, "sketches"),
    (lambda c: {"collect_s": 5.0, "wall_s": 1.0}, "timings"),
    (lambda c: {"step_s": 1.0, "average_s": 2.0}, "timings"),
])
def test_impossible_counts_are_invalid(coord, peer, changes, words):
    receipt = coord.receipt(peer)
    refused(INVALID, coord.submit_receipt, peer, dataclasses.replace(receipt, **changes(receipt)), words=words)
    assert coord.stored() == 0


def test_more_env_steps_than_the_rate_allows_is_invalid(make):
    # (seconds since joining + RATE_SLACK_S 5 s) * 6.5 steps/s: room for one receipt of 32 steps, and for a
    # second only after almost 5 s
    coord = make(max_env_steps_per_second=6.5)
    identity = Identity.generate()
    first, second = (coord.receipt(identity, batch=b) for b in range(2))  # collected before the clock starts
    coord.join(identity)
    coord.submit_receipt(identity, first)
    refused(INVALID, coord.submit_receipt, identity, second, words="max_env_steps_per_second")
    assert coord.stored() == 1 and coord.status().env_steps == STEPS


def test_oversized_receipt_is_invalid(coord, peer):
    receipt = coord.receipt(peer)
    data, signature = raw_receipt(peer, receipt, returns=[[1.5] * 740, [1.5] * 740])
    assert MAX_RECEIPT_BYTES < len(data) < MAX_REQUEST_BYTES - 200  # the request itself is within its limit
    refused(INVALID, coord.submit, data, signature, words=str(MAX_RECEIPT_BYTES))
    assert coord.stored() == 0


def test_receipt_for_another_run_is_invalid(coord, peer):
    receipt = dataclasses.replace(coord.receipt(peer), run_id="another-run")
    refused(INVALID, coord.submit_receipt, peer, receipt, words="run_id")
    assert coord.stored() == 0


def test_receipt_after_the_token_expired_is_unauthenticated_until_renewed(make):
    coord = make(token_ttl=1.5)
    identity = Identity.generate()
    receipts = [coord.receipt(identity, batch=b) for b in range(2)]
    coord.join(identity)
    coord.submit_receipt(identity, receipts[0])
    time.sleep(1.6)
    refused(Code.UNAUTHENTICATED, coord.submit_receipt, identity, receipts[1], words="expired")
    assert coord.stored() == 1
    coord.renew(identity)
    coord.submit_receipt(identity, receipts[1])
    assert coord.stored() == 2


@pytest.mark.parametrize("skew", [-120.0, 120.0])
def test_credentials_with_a_stale_timestamp_are_unauthenticated(coord, skew):
    identity = Identity.generate()
    stale = coord.credentials(identity, "peer-1", timestamp=time.time() + skew)
    refused(Code.UNAUTHENTICATED, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, stale, words="clock")
    assert coord.peers() == 0
    coord.join(identity)
    stale = coord.credentials(identity, "peer-1", LIBP2P_ID, timestamp=time.time() + skew)
    refused(Code.UNAUTHENTICATED, coord.renew, identity, "peer-1", stale, words="clock")
    assert coord.ledger.peer(identity.peer_id)["libp2p_id"] == "" and coord.published == []


def test_replayed_credentials_are_unauthenticated(coord):
    identity = Identity.generate()
    credentials = coord.credentials(identity, "peer-1")
    coord.join(identity, credentials=credentials)
    refused(Code.UNAUTHENTICATED, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, credentials,
            words="replayed")
    credentials = coord.credentials(identity, "peer-1", LIBP2P_ID)
    coord.renew(identity, credentials=credentials)
    refused(Code.UNAUTHENTICATED, coord.renew, identity, "peer-1", credentials, words="replayed")
    assert len(coord.published) == 1


def test_credentials_signed_for_something_else_are_unauthenticated(coord):
    identity = Identity.generate()
    other_name = coord.credentials(identity, "someone-else")
    refused(Code.UNAUTHENTICATED, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, other_name,
            words="signature")
    other_key = pb.Credentials()
    other_key.CopyFrom(coord.credentials(identity, "peer-1"))
    other_key.public_key = Identity.generate().public_key  # claims a key it cannot sign for
    refused(Code.UNAUTHENTICATED, coord.join, identity, "peer-1", "cpu", PROTOCOL_VERSION, other_key,
            words="signature")
    assert coord.peers() == 0


def test_banned_peer_can_neither_join_nor_renew(coord, peer):
    coord.ledger.ban(peer.peer_id, "failed audits")
    refused(Code.PERMISSION_DENIED, coord.renew, peer, words="banned")
    refused(Code.PERMISSION_DENIED, coord.join, peer, words="banned")
    assert coord.published == [] and coord.ledger.peer(peer.peer_id)["libp2p_id"] == ""


def perturbed(state: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def test_parameters_of_an_old_epoch_claimed_as_current_are_out_of_range(coord, peer):
    initial = coord.policy.state_dict()
    for epoch in (1, 2, 3):
        coord.verifier.add_epoch(epoch, perturbed(initial, epoch), f"{epoch:064x}")
    # collected with epoch 0's parameters, labelled epoch 3
    refused(Code.OUT_OF_RANGE, coord.submit_receipt, peer, coord.receipt(peer, epoch=3), words="epoch 0")
    assert coord.stored() == 0
    coord.submit_receipt(peer, coord.receipt(peer, epoch=1))  # labels of peers that averaged together differ by 1
    assert coord.stored() == 1


def test_parameters_matching_no_epoch_are_failed_precondition(coord, peer):
    receipt = coord.receipt(peer)
    forged = [x + 1.0 for x in receipt.params_sketch]
    refused(Code.FAILED_PRECONDITION, coord.submit_receipt, peer, dataclasses.replace(receipt, params_sketch=forged),
            words="match no epoch")
    # sketch entries so large that their squares overflow a float: still refused, not an internal error
    huge = [1e300] * SMALL.sketch_dim
    refused(Code.FAILED_PRECONDITION, coord.submit_receipt, peer, dataclasses.replace(receipt, params_sketch=huge))
    assert coord.stored() == 0


def test_epoch_hash(coord):
    for epoch in (1, 2**64 - 1):
        refused(Code.NOT_FOUND, coord.raw, "EpochHash", pb.EpochHashRequest(epoch=epoch).SerializeToString(),
                words=f"epoch {epoch}")
    reply = pb.EpochHashReply.FromString(coord.raw("EpochHash", pb.EpochHashRequest(epoch=0).SerializeToString()))
    assert (reply.epoch, reply.params_hash) == (0, params_hash(coord.policy))
    key = coord.identity.public_key
    assert verify(key, epoch_hash_message(SMALL.run_id, 0, reply.params_hash), reply.signature)
    assert not verify(key, epoch_hash_message(SMALL.run_id, 1, reply.params_hash), reply.signature)
    assert not verify(key, epoch_hash_message("another-run", 0, reply.params_hash), reply.signature)
    assert not verify(Identity.generate().public_key, epoch_hash_message(SMALL.run_id, 0, reply.params_hash),
                      reply.signature)


# ---- the client ------------------------------------------------------------------------------------------------

def test_real_client_happy_path(coord):
    client = CoordinatorClient(coord.address, timeout=5, retries=2)
    identity = Identity.generate()
    try:
        reply = client.join("client-1", "cpu", coord.credentials(identity, "client-1"))
        assert RunConfig.from_json(reply.run_config_json) == SMALL
        assert list(reply.bootstrap_maddrs) == MADDRS
        token = client.renew_token("client-1", coord.credentials(identity, "client-1", LIBP2P_ID))
        assert verify_token(token.token, token.token_signature, coord.identity.public_key).libp2p_id == LIBP2P_ID
        assert client.submit_receipt(*coord.receipt(identity).sign(identity)).epoch == 0
        status = client.status()
        assert (status.live_peers, status.env_steps, status.peers[0].peer_name) == (1, STEPS, "client-1")
        assert client.epoch_hash(0).params_hash == params_hash(coord.policy)
        assert list(client.list_checkpoints().checkpoints) == []
        with pytest.raises(grpc.RpcError) as info:
            client.submit_receipt(*coord.receipt(identity).sign(identity))
        assert info.value.code() == Code.ALREADY_EXISTS
        assert describe_error(info.value).startswith("ALREADY_EXISTS: a receipt for epoch 0 batch 0")
    finally:
        client.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_on_closed_port_is_unavailable_quickly():
    client = CoordinatorClient(f"127.0.0.1:{closed_port()}", timeout=1, retries=2)
    start = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.status()
    finally:
        client.close()
    assert info.value.code() == Code.UNAVAILABLE
    assert time.monotonic() - start < 10


class Scripted:
    """A Status handler that fails its first calls as told: a status code to abort with, or seconds to stall."""

    def __init__(self, failures: list):
        self.failures, self.calls = list(failures), []
        self.lock = threading.Lock()

    def __call__(self, request, context):
        with self.lock:
            self.calls.append(time.monotonic())
            failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, grpc.StatusCode):
            context.abort(failure, f"scripted {failure.name}")
        if isinstance(failure, float):
            time.sleep(failure)
        return pb.StatusReply(epoch=len(self.calls))


@pytest.fixture
def scripted():
    """A server whose Status fails as scripted: (start(failures) -> (address, handler))."""
    servers = []

    def start(failures: list) -> tuple[str, Scripted]:
        handler = Scripted(failures)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Status": _handler("Status", handler)})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", handler

    yield start
    for server in servers:
        server.stop(None)


def test_client_retries_unavailable_with_backoff(scripted):
    address, handler = scripted([Code.UNAVAILABLE, Code.UNAVAILABLE])
    client = CoordinatorClient(address, timeout=5, retries=3)
    try:
        assert client.status().epoch == 3  # the third attempt answers
    finally:
        client.close()
    gaps = [b - a for a, b in zip(handler.calls, handler.calls[1:])]
    assert len(gaps) == 2 and gaps[0] >= 0.45 and gaps[1] >= 0.95  # 0.5 s, then 1 s


def test_client_retries_a_deadline_once_more(scripted):
    address, handler = scripted([2.0])  # the first call stalls past the client's deadline
    client = CoordinatorClient(address, timeout=0.5, retries=2)
    try:
        assert client.status().epoch == 2
    finally:
        client.close()
    assert len(handler.calls) == 2


def test_client_gives_up_after_its_retries(scripted):
    address, handler = scripted([Code.UNAVAILABLE] * 5)
    client = CoordinatorClient(address, timeout=5, retries=2)
    try:
        e = rpc_error(client.status)
    finally:
        client.close()
    assert e.code() == Code.UNAVAILABLE and "scripted" in e.details()
    assert len(handler.calls) == 2


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED,
                                  Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.OUT_OF_RANGE])
def test_client_does_not_retry_refusals(scripted, code):
    address, handler = scripted([code])
    client = CoordinatorClient(address, timeout=5, retries=3)
    try:
        assert rpc_error(client.status).code() == code
    finally:
        client.close()
    assert len(handler.calls) == 1
