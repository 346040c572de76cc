"""Property-based fuzzing of what volunteers send: the receipt decoder, and every gRPC method of a real running
coordinator (real verifier, real SQLite ledger, one published checkpoint package) fed arbitrary bytes,
well-formed messages with arbitrary field values, and correctly signed receipts with arbitrary contents."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import time
import urllib.request

import grpc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivegym.coordinator.audit import sketch_distance
from hivegym.coordinator.dashboard import Dashboard
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.checkpoint import publish
from hivegym.protocol.identity import Identity
from hivegym.protocol.receipt import (HASH, MAX_RECEIPT_BYTES, PEER_ID, RECEIPT_PREFIX, TIMING_FIELDS, UINT63,
                                      Receipt, ReceiptError, decode_receipt, join_message)
from hivegym.protocol.rpc import REPLY_TYPES, REQUEST_TYPES, SERVICE, STREAMING
from servers import TestServer

Code = grpc.StatusCode
# what a request may be answered with besides OK: each says what is wrong; UNKNOWN or INTERNAL would be a crash
CLEAR = {Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.NOT_FOUND, Code.ALREADY_EXISTS,
         Code.OUT_OF_RANGE, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
FIELDS = [f.name for f in dataclasses.fields(Receipt)]
LIBP2P_ID = "12D3KooWGyU75bZS5iyzoCra23zBKMe3dbToFU2xLQSixMpr9vaM"
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies ---------------------------------------------------------------------------------------------------

# anything msgpack can carry: NaN, infinities, negative and 64-bit integers, nested lists and maps
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=40), st.binary(max_size=40))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=10)
numbers = st.one_of(st.floats(), st.integers(-2**63, 2**64 - 1))
finite = st.floats(allow_nan=False, allow_infinity=False)  # and as large as a double goes
hex16 = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
hex64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
often = st.sampled_from([True] * 4 + [False])  # hypothesis's one_of leans to its first branch; this is 80:20
# per field, values near the schema (right type, wrong range, wrong length) besides the wild ones
PLAUSIBLE = {
    "run_id": st.text(max_size=130),
    "peer_id": st.one_of(hex16, st.text(max_size=20)),
    "epoch": st.one_of(st.integers(0, 3), st.integers(-2**63, 2**64 - 1)),
    "batch": st.one_of(st.integers(0, 2**63 - 1), st.integers(-2**63, 2**64 - 1)),
    "env_steps": st.one_of(st.integers(0, 64), st.integers(-2**63, 2**64 - 1)),
    "returns": st.one_of(st.lists(st.lists(finite, max_size=6), min_size=2, max_size=2),
                         st.lists(st.lists(numbers, max_size=6), max_size=4)),
    "actions": st.lists(st.binary(min_size=15, max_size=17), max_size=4),
    "params_hash": st.one_of(hex64, st.text(max_size=70)),
    "params_sketch": st.one_of(st.lists(finite, min_size=32, max_size=32), st.lists(st.floats(), max_size=34)),
    "update_sketch": st.one_of(st.lists(finite, min_size=32, max_size=32), st.lists(st.floats(), max_size=34)),
    **{name: st.one_of(finite, numbers) for name in TIMING_FIELDS},
}


@st.composite
def receipt_objects(draw, base: dict) -> object:
    """`base` with a few fields replaced by arbitrary values, and now and then a key added or removed."""
    obj = dict(base)
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=3)):
        obj[name] = draw(PLAUSIBLE[name] if draw(often) else anything)
    change = draw(st.sampled_from(["none"] * 18 + ["add", "remove"]))
    if change == "add":
        obj[draw(st.text(max_size=10))] = draw(anything)
    elif change == "remove":
        del obj[draw(st.sampled_from(FIELDS))]
    return obj


@st.composite
def numbers_changed(draw, base: dict) -> dict:
    """`base` with one or two of its numeric fields replaced by finite numbers of any size, shapes kept: a receipt
    that passes the decoder and reaches the verifier's arithmetic."""
    obj = dict(base)
    for name in draw(st.sets(st.sampled_from(["returns", "params_sketch", "update_sketch", *TIMING_FIELDS]),
                             min_size=1, max_size=2)):
        if name == "returns":
            obj[name] = [draw(st.lists(finite, max_size=len(per_env) + 1)) for per_env in base[name]]
        elif name in TIMING_FIELDS:
            obj[name] = draw(st.floats(0.0, allow_infinity=False))
        else:
            obj[name] = draw(st.lists(finite, min_size=len(base[name]), max_size=len(base[name])))
    return obj


def wild_receipts() -> st.SearchStrategy:
    """Maps with exactly a receipt's keys and any values at all."""
    return st.fixed_dictionaries({name: st.one_of(PLAUSIBLE[name], anything) for name in FIELDS})


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---- (a) the receipt decoder --------------------------------------------------------------------------------------

VALID = Receipt(run_id="run", peer_id="0123456789abcdef", epoch=3, batch=7, env_steps=32, returns=[[10.0, 12.5], []],
                actions=[b"a" * 16, b"b" * 16], params_hash="ab" * 32, params_sketch=[0.5] * 32,
                update_sketch=[-0.25] * 32, collect_s=0.1, compute_s=0.2, step_s=0.05, average_s=0.01, wall_s=9.0)


def decode_or_refuse(data: bytes) -> Receipt | None:
    """decode_receipt may refuse only with ReceiptError; what it accepts must be sane."""
    try:
        receipt = decode_receipt(data)
    except ReceiptError as e:
        assert str(e)
        return None
    check_sane(receipt)
    return receipt


def check_sane(r: Receipt) -> None:
    assert isinstance(r, Receipt)
    for name in ("epoch", "batch", "env_steps"):
        value = getattr(r, name)
        assert type(value) is int and 0 <= value <= UINT63, (name, value)
    for name in TIMING_FIELDS:
        value = getattr(r, name)
        assert type(value) is float and math.isfinite(value) and value >= 0, (name, value)
    for values in [*r.returns, r.params_sketch, r.update_sketch]:
        assert isinstance(values, list)
        assert all(type(v) in (int, float) and math.isfinite(v) for v in values), values
    assert all(type(a) is bytes and len(a) == 16 for a in r.actions)
    assert isinstance(r.run_id, str) and 0 < len(r.run_id) <= 128
    assert PEER_ID.fullmatch(r.peer_id) and HASH.fullmatch(r.params_hash)
    assert decode_receipt(r.encode()) == r  # what was accepted encodes back to the same receipt


def test_the_valid_receipt_decodes():
    assert decode_or_refuse(VALID.encode()) == VALID


@FUZZ
@given(data=st.binary(max_size=MAX_RECEIPT_BYTES + 64))
def test_decoder_on_arbitrary_bytes(data):
    decode_or_refuse(data)


@FUZZ
@given(data=st.binary(max_size=64), position=st.integers(0, len(VALID.encode())), cut=st.integers(0, 8))
def test_decoder_on_damaged_receipts(data, position, cut):
    valid = VALID.encode()
    decode_or_refuse(valid[:position] + data + valid[position + cut:])


@FUZZ
@given(obj=receipt_objects(dataclasses.asdict(VALID)))
def test_decoder_on_receipts_with_a_few_arbitrary_fields(obj):
    decode_or_refuse(pack(obj))


@settings(FUZZ, max_examples=60)
@given(obj=wild_receipts())
def test_decoder_on_maps_with_the_right_keys_and_any_values(obj):
    decode_or_refuse(pack(obj))


@FUZZ
@given(obj=anything)
def test_decoder_on_arbitrary_msgpack(obj):
    decode_or_refuse(pack(obj))


@st.composite
def sketch_pairs(draw) -> tuple[list[float], list[float]]:
    """(a peer's sketch: any finite numbers, the coordinator's own: what real parameters give)."""
    n = draw(st.integers(1, 40))
    return (draw(st.lists(finite, min_size=n, max_size=n)),
            draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)))


@FUZZ
@given(pair=sketch_pairs())
def test_sketch_distance_of_any_finite_sketch_is_a_distance(pair):
    """The verifier and the audits compare a peer's sketches with this: no OverflowError, however large they are."""
    a, b = pair
    d = sketch_distance(a, b)
    assert d >= 0 and not math.isnan(d)
    assert sketch_distance(b, b) == 0.0


# ---- (b) a real server, fed everything -------------------------------------------------------------------------

class Swarm:
    """One coordinator for the whole module, so that whatever the examples leave behind accumulates."""

    def __init__(self, tmp_path):
        folder = tmp_path / "checkpoints"
        manifest = {"name": "CartPole-v1-tiny", "role": "student", "size": "tiny", "env_id": "CartPole-v1",
                    "architecture": {"hidden": [4]}, "params": 35, "param_share": 0.0076, "teacher": {"epoch": 4}}
        signed = publish(folder, manifest, b"weights" * 1000, Identity.generate())
        self.package, self.sha256 = "CartPole-v1-tiny", signed["weights"]["sha256"]
        self.server = TestServer(tmp_path, checkpoints_dir=folder)
        self.ledger_path = tmp_path / "ledger.sqlite"
        self.channel = grpc.insecure_channel(self.server.address)
        self.known, self.banned = Identity.generate(), Identity.generate()
        self.pool = [self.known, self.banned, Identity.generate(), Identity.generate()]
        for identity, name in ((self.known, "known-1"), (self.banned, "banned-1")):
            self.call_ok("Join", pb.JoinRequest(protocol_version=1, peer_name=name, device="cpu",
                                                credentials=self.server.credentials(identity, name)))
        self.server.ledger.ban(self.banned.peer_id, "fuzzing")
        self.honest = dataclasses.asdict(self.server.receipt(self.known))
        self.accepted = 0  # receipts the server said OK to

    def raw(self, method: str, data: bytes) -> list[bytes]:
        if method in STREAMING:
            return list(self.channel.unary_stream(f"/{SERVICE}/{method}")(data, timeout=10))
        return [self.channel.unary_unary(f"/{SERVICE}/{method}")(data, timeout=10)]

    def call(self, method: str, data: bytes) -> grpc.StatusCode:
        """OK and well-formed replies, or a clear refusal that says why; never a crash."""
        try:
            replies = self.raw(method, data)
        except grpc.RpcError as e:
            assert e.code() in CLEAR, (method, e.code(), e.details())
            assert e.details(), (method, e.code())
            return e.code()
        for reply in replies:
            REPLY_TYPES[method].FromString(reply)
        assert replies or method not in STREAMING  # a download always sends at least its manifest
        if method == "SubmitReceipt":
            self.accepted += 1
        return Code.OK

    def call_ok(self, method: str, request) -> None:
        assert self.call(method, request.SerializeToString()) == Code.OK

    def stored(self) -> int:
        with sqlite3.connect(self.ledger_path) as db:
            return db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def close(self) -> None:
        self.channel.close()
        self.server.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    swarm = Swarm(tmp_path_factory.mktemp("fuzz"))
    yield swarm
    swarm.close()


names = st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), st.text(max_size=70))
valid_names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
libp2p_ids = st.one_of(st.just(""), st.just(LIBP2P_ID), st.from_regex(r"[1-9A-HJ-NP-Za-km-z]{30,64}", fullmatch=True),
                       st.text(max_size=70))


@st.composite
def credentials(draw, swarm: Swarm, name: str) -> pb.Credentials:
    """Mostly correctly signed (for this or another name, at any time), sometimes any bytes at all."""
    identity = draw(st.sampled_from(swarm.pool))
    libp2p_id = draw(st.just(LIBP2P_ID) if draw(often) else libp2p_ids)
    offset = draw(st.floats(-1, 1) if draw(often) else st.floats())
    timestamp = time.time() + offset if math.isfinite(offset) else offset
    signed_name = name if draw(often) else draw(names)
    signature = identity.sign(join_message(swarm.server.identity.public_key, signed_name, libp2p_id, timestamp))
    return pb.Credentials(public_key=identity.public_key if draw(often) else draw(st.binary(max_size=40)),
                          libp2p_id=libp2p_id, timestamp=timestamp,
                          signature=signature if draw(often) else draw(st.binary(max_size=70)))


@st.composite
def join_requests(draw, swarm: Swarm) -> pb.JoinRequest:
    name = draw(valid_names if draw(often) else names)
    return pb.JoinRequest(protocol_version=1 if draw(often) else draw(st.integers(0, 2**32 - 1)), peer_name=name,
                          device=draw(st.sampled_from(["cpu", "cuda", "mps"]) if draw(often) else st.text(max_size=10)),
                          credentials=draw(credentials(swarm, name)))


@st.composite
def renew_requests(draw, swarm: Swarm) -> pb.RenewTokenRequest:
    name = draw(valid_names if draw(often) else names)
    return pb.RenewTokenRequest(peer_name=name, credentials=draw(credentials(swarm, name)))


@st.composite
def submit_requests(draw, swarm: Swarm) -> pb.SubmitReceiptRequest:
    """Receipts with arbitrary contents, mostly signed by the peer they name (so every check is reached)."""
    kind = draw(st.sampled_from(["few fields"] * 4 + ["numbers"] * 3 + ["wild", "anything", "bytes"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=200))
    else:
        base = {**swarm.honest, "batch": draw(st.integers(1, 2**63 - 1))}  # mostly a batch not claimed yet
        data = pack(draw({"few fields": receipt_objects(base), "numbers": numbers_changed(base),
                          "wild": wild_receipts(), "anything": anything}[kind]))
    signer = swarm.known if draw(often) else draw(st.sampled_from(swarm.pool))
    signature = signer.sign(RECEIPT_PREFIX + data) if draw(often) else draw(st.binary(max_size=70))
    return pb.SubmitReceiptRequest(receipt=data, signature=signature)


@st.composite
def register_requests(draw, swarm: Swarm) -> pb.RegisterReducerRequest:
    """Mostly credentials of a peer key (refused: only the coordinator's key registers), with arbitrary maddrs."""
    maddr = st.one_of(st.just(f"/ip4/127.0.0.1/tcp/1/p2p/{LIBP2P_ID}"), st.text(max_size=600))
    return pb.RegisterReducerRequest(credentials=draw(credentials(swarm, "reducer")),
                                     maddrs=draw(st.lists(maddr, max_size=20)))


def download_requests(swarm: Swarm) -> st.SearchStrategy:
    return st.builds(pb.DownloadCheckpointRequest,
                     name=st.one_of(st.just(swarm.package), st.just("CartPole-v1-teacher"), st.text(max_size=90)),
                     offset=st.one_of(st.integers(0, 8000), st.integers(-2**63, 2**63 - 1)),
                     sha256=st.one_of(st.just(""), st.just(swarm.sha256), hex64, st.text(max_size=70)))


def messages(method: str, swarm: Swarm) -> st.SearchStrategy:
    return {
        "Join": lambda: join_requests(swarm),
        "RenewToken": lambda: renew_requests(swarm),
        "SubmitReceipt": lambda: submit_requests(swarm),
        "RegisterReducer": lambda: register_requests(swarm),
        "EpochHash": lambda: st.builds(pb.EpochHashRequest, epoch=st.one_of(st.integers(0, 3),
                                                                            st.integers(0, 2**64 - 1))),
        "Status": lambda: st.just(pb.StatusRequest()),
        "ListCheckpoints": lambda: st.just(pb.ListCheckpointsRequest()),
        "DownloadCheckpoint": lambda: download_requests(swarm),
    }[method]()


def valid_bytes(method: str, swarm: Swarm) -> bytes:
    """One well-formed request per method, for the fuzzer to damage."""
    examples = {"Join": pb.JoinRequest(protocol_version=1, peer_name="known-1", device="cpu",
                                       credentials=swarm.server.credentials(swarm.known, "known-1")),
                "RenewToken": pb.RenewTokenRequest(peer_name="known-1", credentials=swarm.server.credentials(
                    swarm.known, "known-1", LIBP2P_ID)),
                "SubmitReceipt": pb.SubmitReceiptRequest(receipt=pack(swarm.honest), signature=b"s" * 64),
                "RegisterReducer": pb.RegisterReducerRequest(
                    credentials=swarm.server.credentials(swarm.known, "reducer", LIBP2P_ID),
                    maddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{LIBP2P_ID}"]),
                "EpochHash": pb.EpochHashRequest(epoch=0), "Status": pb.StatusRequest(),
                "ListCheckpoints": pb.ListCheckpointsRequest(),
                "DownloadCheckpoint": pb.DownloadCheckpointRequest(name=swarm.package, offset=10)}
    return examples[method].SerializeToString()


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
def test_arbitrary_bytes_to_every_method(swarm, method):
    valid = valid_bytes(method, swarm)

    @settings(FUZZ, max_examples=60)
    @given(data=st.one_of(st.binary(max_size=2048),
                          st.tuples(st.integers(0, len(valid)), st.integers(0, 4), st.binary(max_size=16)).map(
                              lambda t: valid[:t[0]] + t[2] + valid[t[0] + t[1]:])))
    def fuzz(data):
        swarm.call(method, data)

    fuzz()
    assert swarm.call("Status", b"") == Code.OK


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
def test_well_formed_messages_with_arbitrary_fields(swarm, method):
    @settings(FUZZ, max_examples=150 if method in ("SubmitReceipt", "Join", "RenewToken") else 60)
    @given(request=messages(method, swarm))
    def fuzz(request):
        swarm.call(method, request.SerializeToString())

    fuzz()
    assert swarm.call("Status", b"") == Code.OK


def test_the_server_still_works_after_the_fuzzing(swarm, tmp_path):
    status = pb.StatusReply.FromString(swarm.raw("Status", b"")[0])
    assert swarm.stored() == swarm.accepted  # every OK stored one receipt, every refusal none
    assert status.coordinator_key == swarm.server.identity.public_key
    # an honest peer is still served: a fresh receipt of a batch nobody has claimed
    fresh = swarm.server.receipt(swarm.known, batch=2**62 + 1)
    data, signature = fresh.sign(swarm.known)
    request = pb.SubmitReceiptRequest(receipt=data, signature=signature)
    assert swarm.call("SubmitReceipt", request.SerializeToString()) == Code.OK
    assert swarm.stored() == swarm.accepted
    chunks = [pb.CheckpointChunk.FromString(c) for c in swarm.raw(
        "DownloadCheckpoint", pb.DownloadCheckpointRequest(name=swarm.package).SerializeToString())]
    assert b"".join(c.data for c in chunks) == b"weights" * 1000
    # whatever the accepted receipts carried, the dashboard over this state still answers in valid JSON
    dashboard = Dashboard(swarm.server.state, tmp_path, "127.0.0.1", 0, {})
    try:
        with urllib.request.urlopen(dashboard.url + "api/status", timeout=10) as reply:
            answer = json.loads(reply.read(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    finally:
        dashboard.close()
    assert {p["peer_id"] for p in answer["peers"]} == set(swarm.server.state.peers)
