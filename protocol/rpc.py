"""The coordinator's gRPC contract: method names, size limits, request validation and a client.

hivegym_pb2.py is generated from hivegym.proto:
    python -m grpc_tools.protoc -I protocol --python_out=protocol protocol/hivegym.proto
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Iterator, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.checkpoint import SHA256, CheckpointError, check_name
from hivegym.protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SERVICE = "hivegym.Coordinator"
MAX_REQUEST_BYTES = 16 * 1024  # every request is a few hundred bytes; larger ones are refused
MAX_TRANSPORT_BYTES = 1024 * 1024  # gRPC refuses anything larger before our handlers see it
PEER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LIBP2P_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,64}$")
DEVICES = ("cpu", "cuda", "mps")

REQUEST_TYPES: dict[str, type[Message]] = {
    "Join": pb.JoinRequest,
    "RenewToken": pb.RenewTokenRequest,
    "SubmitReceipt": pb.SubmitReceiptRequest,
    "EpochHash": pb.EpochHashRequest,
    "RegisterReducer": pb.RegisterReducerRequest,
    "Status": pb.StatusRequest,
    "ListCheckpoints": pb.ListCheckpointsRequest,
    "DownloadCheckpoint": pb.DownloadCheckpointRequest,
}
REPLY_TYPES: dict[str, type[Message]] = {
    "Join": pb.JoinReply,
    "RenewToken": pb.TokenReply,
    "SubmitReceipt": pb.SubmitReceiptReply,
    "EpochHash": pb.EpochHashReply,
    "RegisterReducer": pb.RegisterReducerReply,
    "Status": pb.StatusReply,
    "ListCheckpoints": pb.ListCheckpointsReply,
    "DownloadCheckpoint": pb.CheckpointChunk,
}
STREAMING = {"DownloadCheckpoint"}  # server streaming: the reply type is that of each message
CHUNK_BYTES = 256 * 1024  # weights per CheckpointChunk, well under MAX_TRANSPORT_BYTES

M = TypeVar("M", bound=Message)


class BadRequest(ValueError):
    """A request that must be answered with INVALID_ARGUMENT; the message says what is wrong."""


def parse_request(method: str, data: bytes) -> Message:
    """Decode and validate raw request bytes for `method`, or raise BadRequest."""
    if len(data) > MAX_REQUEST_BYTES:
        raise BadRequest(f"{method} request is {len(data)} bytes; the limit is {MAX_REQUEST_BYTES}")
    try:
        request = REQUEST_TYPES[method].FromString(data)
    except DecodeError as e:
        raise BadRequest(f"{method} request is not a valid {REQUEST_TYPES[method].__name__}: {e}") from None
    if isinstance(request, pb.JoinRequest):
        if request.protocol_version != PROTOCOL_VERSION:
            raise BadRequest(f"protocol_version {request.protocol_version} is not supported (this coordinator "
                             f"speaks {PROTOCOL_VERSION}); upgrade hivegym")
        _check_name(request.peer_name)
        if request.device not in DEVICES:
            raise BadRequest(f"device must be one of {', '.join(DEVICES)}, got {request.device[:32]!r}")
        _check_credentials(request.credentials)
    elif isinstance(request, pb.RenewTokenRequest):
        _check_name(request.peer_name)
        _check_credentials(request.credentials)
        if not LIBP2P_ID.fullmatch(request.credentials.libp2p_id):
            raise BadRequest("credentials.libp2p_id must be the peer's hivemind peer id (base58)")
    elif isinstance(request, pb.RegisterReducerRequest):
        _check_credentials(request.credentials)
        if len(request.maddrs) > 16 or any(len(m) > 512 or "/p2p/" not in m for m in request.maddrs):
            raise BadRequest("maddrs must be at most 16 multiaddrs of at most 512 characters, each with /p2p/ID")
    elif isinstance(request, pb.SubmitReceiptRequest):
        if not request.receipt:
            raise BadRequest("receipt is empty")
        if len(request.signature) != SIGNATURE_BYTES:
            raise BadRequest(f"signature must be {SIGNATURE_BYTES} bytes, got {len(request.signature)}")
    elif isinstance(request, pb.DownloadCheckpointRequest):
        try:
            check_name(request.name)
        except CheckpointError as e:
            raise BadRequest(str(e)) from None
        if request.offset < 0:
            raise BadRequest(f"offset must be >= 0, got {request.offset}")
        if request.sha256 and not SHA256.fullmatch(request.sha256):
            raise BadRequest("sha256 must be empty or 64 lowercase hex digits")
    return request


def _check_credentials(credentials: pb.Credentials) -> None:
    if len(credentials.public_key) != PUBLIC_KEY_BYTES:
        raise BadRequest(f"credentials.public_key must be {PUBLIC_KEY_BYTES} bytes, got {len(credentials.public_key)}")
    if len(credentials.signature) != SIGNATURE_BYTES:
        raise BadRequest(f"credentials.signature must be {SIGNATURE_BYTES} bytes, got {len(credentials.signature)}")
    if credentials.libp2p_id and not LIBP2P_ID.fullmatch(credentials.libp2p_id):
        raise BadRequest("credentials.libp2p_id must be empty or a base58 hivemind peer id")
    if not math.isfinite(credentials.timestamp):
        raise BadRequest("credentials.timestamp must be finite")


def _check_name(name: str) -> None:
    if not PEER_NAME.fullmatch(name):
        raise BadRequest(f"peer_name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {name[:80]!r}")


class CoordinatorClient:
    """Synchronous client; every call has a deadline and bounded retries with exponential backoff."""

    def __init__(self, address: str, timeout: float = 5.0, retries: int = 3):
        self.address, self.timeout, self.retries = address, timeout, retries
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length",
                                                                MAX_TRANSPORT_BYTES)])
        self._calls = {
            name: (self.channel.unary_stream if name in STREAMING else self.channel.unary_unary)(
                f"/{SERVICE}/{name}", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=REPLY_TYPES[name].FromString)
            for name in REQUEST_TYPES
        }

    def call(self, method: str, request: Message, retries: int | None = None) -> Message:
        """Call `method`; retries UNAVAILABLE and DEADLINE_EXCEEDED, raises grpc.RpcError after the last try."""
        attempts = self.retries if retries is None else retries
        for attempt in range(attempts):
            try:
                return self._calls[method](request, timeout=self.timeout)
            except grpc.RpcError as e:
                retriable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retriable or attempt == attempts - 1:
                    raise
                delay = min(0.5 * 2**attempt, 5.0)
                logger.debug("%s to %s failed (%s); retrying in %.1fs", method, self.address, e.code().name, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def join(self, peer_name: str, device: str, credentials: pb.Credentials) -> pb.JoinReply:
        return self.call("Join", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, peer_name=peer_name,
                                                device=device, credentials=credentials))

    def renew_token(self, peer_name: str, credentials: pb.Credentials) -> pb.TokenReply:
        return self.call("RenewToken", pb.RenewTokenRequest(peer_name=peer_name, credentials=credentials))

    def submit_receipt(self, receipt: bytes, signature: bytes) -> pb.SubmitReceiptReply:
        return self.call("SubmitReceipt", pb.SubmitReceiptRequest(receipt=receipt, signature=signature))

    def register_reducer(self, credentials: pb.Credentials, maddrs: list[str]) -> pb.RegisterReducerReply:
        return self.call("RegisterReducer", pb.RegisterReducerRequest(credentials=credentials, maddrs=maddrs))

    def epoch_hash(self, epoch: int) -> pb.EpochHashReply:
        return self.call("EpochHash", pb.EpochHashRequest(epoch=epoch))

    def status(self) -> pb.StatusReply:
        return self.call("Status", pb.StatusRequest())

    def list_checkpoints(self) -> pb.ListCheckpointsReply:
        return self.call("ListCheckpoints", pb.ListCheckpointsRequest())

    def download_checkpoint(self, name: str, offset: int, sha256: str = "") -> Iterator[pb.CheckpointChunk]:
        """One streaming attempt, with the deadline on the whole stream; the caller resumes from its offset."""
        request = pb.DownloadCheckpointRequest(name=name, offset=offset, sha256=sha256)
        return self._calls["DownloadCheckpoint"](request, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()


def describe_error(e: grpc.RpcError) -> str:
    """One line for a failed call, e.g. 'UNAVAILABLE: failed to connect to all addresses'."""
    details = (e.details() or "").splitlines()[0] if e.details() else ""
    return f"{e.code().name}: {details}" if details else e.code().name
