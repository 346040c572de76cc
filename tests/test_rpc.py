"""The coordinator's real gRPC server, in-process, over a real channel on 127.0.0.1."""

import contextlib
import math
import socket
import time

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from hivegym.coordinator.server import SwarmState, start_server
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import RunConfig
from hivegym.protocol.rpc import (MAX_REQUEST_BYTES, MAX_TRANSPORT_BYTES, PROTOCOL_VERSION, SERVICE,
                                  CoordinatorClient)

MADDRS = ["/ip4/127.0.0.1/tcp/1/p2p/x"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Coordinator:
    """A running server plus a raw channel whose calls send and receive bytes."""

    def __init__(self):
        self.state = SwarmState(RunConfig().to_json(), list(MADDRS))
        self.server, self.port = start_server(self.state, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)

    def raw(self, method: str, data: bytes) -> bytes:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")(data, timeout=10)

    def join(self, name="peer-1", device="cpu", version=PROTOCOL_VERSION) -> pb.JoinReply:
        request = pb.JoinRequest(protocol_version=version, peer_name=name, device=device)
        return pb.JoinReply.FromString(self.raw("Join", request.SerializeToString()))

    def report(self, **fields) -> pb.ReportReply:
        return pb.ReportReply.FromString(self.raw("Report", pb.ReportRequest(**fields).SerializeToString()))

    def status(self) -> pb.StatusReply:
        return pb.StatusReply.FromString(self.raw("Status", b""))

    def close(self):
        self.channel.close()
        self.server.stop(None)


@contextlib.contextmanager
def running():
    coordinator = Coordinator()
    try:
        yield coordinator
    finally:
        coordinator.close()


@pytest.fixture
def coord():
    with running() as coordinator:
        yield coordinator


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.details(), "every refusal must say why"
    return info.value


def test_join_returns_config_and_bootstrap_addresses(coord):
    reply = coord.join()
    assert RunConfig.from_json(reply.run_config_json) == RunConfig()
    assert list(reply.bootstrap_maddrs) == MADDRS


def test_report_before_join_is_failed_precondition(coord):
    e = rpc_error(coord.report, peer_name="stranger", env_steps=1)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Join" in e.details()


def test_decreasing_counters_are_invalid(coord):
    coord.join()
    coord.report(peer_name="peer-1", env_steps=100, samples=50)
    assert rpc_error(coord.report, peer_name="peer-1", env_steps=99, samples=50).code() == INVALID
    assert rpc_error(coord.report, peer_name="peer-1", env_steps=100, samples=49).code() == INVALID
    assert coord.status().env_steps == 100  # the refused report changed nothing


def test_status_reflects_reports_and_live_peers(coord):
    status = coord.status()
    assert (status.live_peers, status.env_steps, status.has_eval) == (0, 0, False)
    coord.join("a")
    coord.join("b", device="cuda")
    coord.report(peer_name="a", epoch=2, env_steps=300, samples=100, mean_return=10.0, samples_per_second=50.0)
    coord.report(peer_name="b", epoch=2, env_steps=200, samples=100, mean_return=12.0, samples_per_second=25.0)
    status = coord.status()
    assert status.live_peers == 2
    assert status.env_steps == 500
    assert status.samples_per_second == pytest.approx(75.0)
    assert status.uptime_s >= 0


def test_huge_counters_do_not_break_status(coord):
    for name in ("a", "b"):
        coord.join(name)
        coord.report(peer_name=name, env_steps=2**63, samples=2**63)
    assert coord.status().env_steps == 2**64 - 1  # saturates instead of failing every Status call


def test_rejoin_keeps_env_steps_counted(coord):
    coord.join("a")
    coord.report(peer_name="a", env_steps=300)
    coord.join("a")  # a restarted peer counts from zero again
    coord.report(peer_name="a", env_steps=10)
    assert coord.status().env_steps == 310


@pytest.mark.parametrize("method", ["Join", "Report", "Status"])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0f", b"\x12\x05ab", b"\x00"])
def test_garbage_bytes_are_invalid_argument(coord, method, data):
    e = rpc_error(coord.raw, method, data)
    assert e.code() == INVALID
    assert "not a valid" in e.details()


def test_message_of_the_wrong_type_is_invalid_argument(coord):
    # An Any's field 2 is bytes; a JoinRequest's field 2 is a string, which must be UTF-8
    wrong = any_pb2.Any(type_url="x", value=b"\xff\xfe").SerializeToString()
    e = rpc_error(coord.raw, "Join", wrong)
    assert e.code() == INVALID and "not a valid JoinRequest" in e.details()
    # the same for a ReportRequest's field 1 (peer_name)
    wrong = wrappers_pb2.BytesValue(value=b"\x80").SerializeToString()
    e = rpc_error(coord.raw, "Report", wrong)
    assert e.code() == INVALID and "not a valid ReportRequest" in e.details()
    # a StatusReply parses as a JoinRequest (mismatched wire types become unknown fields), but it is refused
    status = pb.StatusReply(epoch=3, live_peers=2, samples_per_second=1.5, env_steps=9).SerializeToString()
    assert rpc_error(coord.raw, "Join", status).code() == INVALID


def test_oversized_requests(coord):
    padding = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, peer_name="a", device="cpu").SerializeToString()
    unknown_field = b"\xfa\x3f"  # field 1023, length-delimited: parses, and only its size is wrong
    big = padding + unknown_field + _varint(MAX_REQUEST_BYTES) + b"x" * MAX_REQUEST_BYTES
    assert MAX_REQUEST_BYTES < len(big) < MAX_TRANSPORT_BYTES
    e = rpc_error(coord.raw, "Join", big)
    assert e.code() == INVALID and str(MAX_REQUEST_BYTES) in e.details()
    huge = b"\x00" * (MAX_TRANSPORT_BYTES + 1)
    assert rpc_error(coord.raw, "Status", huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert coord.status().live_peers == 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/no", "ünï", "a\nb"])
def test_bad_peer_name_is_invalid(coord, name):
    e = rpc_error(coord.join, name=name)
    assert e.code() == INVALID and "peer_name" in e.details()
    e = rpc_error(coord.report, peer_name=name)
    assert e.code() == INVALID and "peer_name" in e.details()


def test_bad_join_fields_are_invalid(coord):
    e = rpc_error(coord.join, version=PROTOCOL_VERSION + 1)
    assert e.code() == INVALID and "protocol_version" in e.details()
    e = rpc_error(coord.join, version=0)
    assert e.code() == INVALID and "protocol_version" in e.details()
    e = rpc_error(coord.join, device="tpu")
    assert e.code() == INVALID and "device" in e.details()
    assert coord.status().live_peers == 0


@pytest.mark.parametrize("fields, word", [
    ({"mean_return": math.nan}, "mean_return"),
    ({"mean_return": math.inf}, "mean_return"),
    ({"samples_per_second": math.nan}, "samples_per_second"),
    ({"samples_per_second": -1.0}, "samples_per_second"),
    ({"wall_s": math.inf}, "wall_s"),
    ({"collect_s": -0.5, "wall_s": 10.0}, "collect_s"),
    ({"average_s": math.nan, "wall_s": 10.0}, "average_s"),
    ({"step_s": 60.0, "wall_s": 10.0}, "step_s cannot exceed wall_s"),
])
def test_bad_report_fields_are_invalid(coord, fields, word):
    coord.join("a")
    e = rpc_error(coord.report, peer_name="a", env_steps=1, **fields)
    assert e.code() == INVALID and word in e.details()


def test_server_survives_abuse(coord):
    for method in ("Join", "Report", "Status"):
        for data in (b"\xff" * 10, b"\x00" * (MAX_REQUEST_BYTES + 1)):
            with pytest.raises(grpc.RpcError):
                coord.raw(method, data)
    with pytest.raises(grpc.RpcError):
        coord.join(name="bad name")
    with pytest.raises(grpc.RpcError):
        coord.report(peer_name="nobody")
    coord.join("ok")
    coord.report(peer_name="ok", env_steps=5)
    status = coord.status()
    assert (status.live_peers, status.env_steps) == (1, 5)


def test_reflection_lists_the_service(coord):
    stub = reflection_pb2_grpc.ServerReflectionStub(coord.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names


OK_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


@pytest.fixture(scope="module")
def shared():
    """One server for every example of a property test, so that whatever they leave behind accumulates."""
    with running() as coordinator:
        coordinator.join("known-1")
        coordinator.join("known-2")
        yield coordinator


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash_the_server(shared, data):
    for method in ("Join", "Report", "Status"):
        try:
            shared.raw(method, data)
        except grpc.RpcError as e:
            assert e.code() in OK_CODES, (method, e.code(), e.details())
            assert e.details()
    shared.status()


@settings(max_examples=100, deadline=None, database=None)
@given(name=st.one_of(st.sampled_from(["known-1", "known-2"]), st.text(max_size=70)), device=st.sampled_from(["cpu", "cuda", "x", ""]),
       version=st.integers(0, 2**32 - 1), steps=st.integers(0, 2**64 - 1), mean=st.floats(), rate=st.floats())
def test_arbitrary_fields_never_crash_the_server(shared, name, device, version, steps, mean, rate):
    for call in (lambda: shared.join(name, device, version),
                 lambda: shared.report(peer_name=name, env_steps=steps, samples=steps, mean_return=mean,
                                       samples_per_second=rate)):
        try:
            call()
        except grpc.RpcError as e:
            assert e.code() in OK_CODES, (e.code(), e.details())
            assert e.details()
    shared.status()


def test_real_client_happy_path(coord):
    client = CoordinatorClient(coord.address, timeout=5, retries=2)
    try:
        reply = client.join("client-1", "cpu")
        assert RunConfig.from_json(reply.run_config_json) == RunConfig()
        assert list(reply.bootstrap_maddrs) == MADDRS
        client.report(pb.ReportRequest(peer_name="client-1", epoch=1, env_steps=64, samples=32, mean_return=9.5,
                                       samples_per_second=100.0))
        status = client.status()
        assert (status.live_peers, status.env_steps) == (1, 64)
        with pytest.raises(grpc.RpcError) as info:
            client.report(pb.ReportRequest(peer_name="client-1", env_steps=1))
        assert info.value.code() == INVALID
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
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10
