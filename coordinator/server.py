"""The coordinator's gRPC server: Join, Report, Status and the checkpoint downloads over a thread pool, with
reflection."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from hivegym.coordinator.checkpoint_service import CheckpointStore
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.rpc import (MAX_TRANSPORT_BYTES, REQUEST_TYPES, SERVICE, STREAMING, TIMING_FIELDS, BadRequest,
                                  parse_request)

logger = logging.getLogger(__name__)

LIVE_WINDOW_S = 5.0  # a volunteer that has not reported for this long is not counted as live
MAX_PEERS = 10_000  # volunteers remembered at once; joins beyond this are refused
UINT64_MAX = 2**64 - 1  # peers report uint64 counters; their sum saturates here instead of failing Status


@dataclass
class PeerRecord:
    device: str
    joined: float
    last_seen: float
    epoch: int = 0
    env_steps: int = 0
    samples: int = 0
    mean_return: float = 0.0
    samples_per_second: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # cumulative seconds per phase, from its reports


@dataclass
class SwarmState:
    """What the coordinator knows of the swarm; shared by the gRPC threads and the main loop (under lock)."""

    run_config_json: str
    bootstrap_maddrs: list[str]
    started: float = field(default_factory=time.monotonic)
    first_report: float | None = None  # monotonic time of the first volunteer Report (training has begun)
    epoch: int = 0
    own_env_steps: int = 0
    retired_env_steps: int = 0  # env steps of peers that re-joined under the same name
    own_samples_per_second: float = 0.0
    last_eval_return: float | None = None
    last_eval_epoch: int = 0
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    checkpoints_dir: Path | None = None  # where the signed checkpoint packages are published
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live_peers(self, now: float) -> list[PeerRecord]:
        return [p for p in self.peers.values() if now - p.last_seen <= LIVE_WINDOW_S]

    def env_steps(self) -> int:
        return self.own_env_steps + self.retired_env_steps + sum(p.env_steps for p in self.peers.values())

    def samples_per_second(self, now: float) -> float:
        return self.own_samples_per_second + sum(p.samples_per_second for p in self.live_peers(now))


class CoordinatorService:
    """Handlers take raw bytes so that undecodable input gets INVALID_ARGUMENT, not gRPC's INTERNAL."""

    def __init__(self, state: SwarmState):
        self.state = state

    def join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        now = time.monotonic()
        with self.state.lock:
            known = request.peer_name in self.state.peers
            if not known and len(self.state.peers) >= MAX_PEERS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this swarm already has {MAX_PEERS} peers")
            if known:  # a peer that restarts keeps its name; its counters start again from zero
                self.state.retired_env_steps += self.state.peers[request.peer_name].env_steps
            self.state.peers[request.peer_name] = PeerRecord(request.device, now, now)
        logger.info("peer %s joined (%s)", request.peer_name, request.device)
        return pb.JoinReply(run_config_json=self.state.run_config_json,
                            bootstrap_maddrs=self.state.bootstrap_maddrs)

    def report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportReply:
        with self.state.lock:
            peer = self.state.peers.get(request.peer_name)
            if peer is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unknown peer {request.peer_name!r}: Join first")
            if request.env_steps < peer.env_steps or request.samples < peer.samples:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "cumulative env_steps and samples cannot decrease")
            peer.last_seen = time.monotonic()
            if self.state.first_report is None:
                self.state.first_report = peer.last_seen
            peer.epoch, peer.env_steps, peer.samples = request.epoch, request.env_steps, request.samples
            peer.mean_return, peer.samples_per_second = request.mean_return, request.samples_per_second
            peer.timings = {name: getattr(request, name) for name in TIMING_FIELDS}
            return pb.ReportReply(epoch=self.state.epoch)

    def status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        now = time.monotonic()
        with self.state.lock:
            s = self.state
            return pb.StatusReply(
                epoch=s.epoch, live_peers=len(s.live_peers(now)), samples_per_second=s.samples_per_second(now),
                env_steps=min(s.env_steps(), UINT64_MAX), has_eval=s.last_eval_return is not None,
                last_eval_return=s.last_eval_return or 0.0, last_eval_epoch=s.last_eval_epoch,
                uptime_s=now - s.started,
            )


def _handler(method: str, fn):
    def handle(data: bytes, context: grpc.ServicerContext):
        try:
            request = parse_request(method, data)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return fn(request, context)

    kind = grpc.unary_stream_rpc_method_handler if method in STREAMING else grpc.unary_unary_rpc_method_handler
    return kind(handle, request_deserializer=None, response_serializer=lambda m: m.SerializeToString())


def start_server(state: SwarmState, host: str, port: int, workers: int = 8) -> tuple[grpc.Server, int]:
    """Start the server; returns (server, bound port). Raises RuntimeError if the address cannot be bound."""
    service, store = CoordinatorService(state), CheckpointStore(state.checkpoints_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", MAX_TRANSPORT_BYTES)])
    methods = {"Join": service.join, "Report": service.report, "Status": service.status,
               "ListCheckpoints": store.list, "DownloadCheckpoint": store.download}
    assert methods.keys() == REQUEST_TYPES.keys()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {m: _handler(m, fn) for m, fn in methods.items()})])
    reflection.enable_server_reflection([SERVICE, reflection.SERVICE_NAME], server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {host}:{port}: {e}") from None
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port} (address in use or not local?)")
    server.start()
    return server, bound
