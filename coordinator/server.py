"""The coordinator's gRPC server over a thread pool, with reflection: Join, RenewToken, SubmitReceipt and EpochHash
(checked by coordinator/verifier.py), Status, and the checkpoint downloads."""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from hivegym.coordinator.checkpoint_service import CheckpointStore
from hivegym.coordinator.ledger import Ledger
from hivegym.coordinator.verifier import Refused, Verifier
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.identity import peer_id
from hivegym.protocol.rpc import MAX_TRANSPORT_BYTES, REQUEST_TYPES, SERVICE, STREAMING, BadRequest, parse_request

logger = logging.getLogger(__name__)

LIVE_WINDOW_S = 5.0  # a volunteer that has not reported for this long is not counted as live
MAX_PEERS = 10_000  # volunteers remembered at once; joins beyond this are refused
UINT64_MAX = 2**64 - 1  # peers report uint64 counters; their sum saturates here instead of failing Status


@dataclass
class PeerRecord:
    name: str
    device: str
    joined: float
    last_seen: float
    epoch: int = 0
    env_steps: int = 0
    samples: int = 0
    mean_return: float = math.nan  # over the episodes that ended in its last receipt that had any
    samples_per_second: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # cumulative seconds per phase, from its receipts


@dataclass
class SwarmState:
    """What the coordinator knows of the swarm; shared by the gRPC threads and the main loop (under lock)."""

    run_config_json: str
    bootstrap_maddrs: list[str]
    started: float = field(default_factory=time.monotonic)
    first_report: float | None = None  # monotonic time of the first volunteer receipt (training has begun)
    epoch: int = 0
    retired_env_steps: int = 0  # env steps of peers that joined again with the same key
    last_eval_return: float | None = None
    last_eval_epoch: int = 0
    peers: dict[str, PeerRecord] = field(default_factory=dict)  # by peer id
    checkpoints_dir: Path | None = None  # where the signed checkpoint packages are published
    owner_tag: bytes = b""  # the trusted peer's hivemind record tag (extra reducers validate records with it)
    ledger: Ledger | None = None  # the verifier's ledger, for the dashboard's audit and credit columns
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live_peers(self, now: float) -> list[PeerRecord]:
        return [p for p in self.peers.values() if now - p.last_seen <= LIVE_WINDOW_S]

    def env_steps(self) -> int:
        return self.retired_env_steps + sum(p.env_steps for p in self.peers.values())

    def samples_per_second(self, now: float) -> float:
        return sum(p.samples_per_second for p in self.live_peers(now))


class CoordinatorService:
    """Handlers take raw bytes so that undecodable input gets INVALID_ARGUMENT, not gRPC's INTERNAL."""

    def __init__(self, state: SwarmState, verifier: Verifier):
        self.state, self.verifier = state, verifier

    def join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        with self.state.lock:
            if len(self.state.peers) >= MAX_PEERS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this swarm already has {MAX_PEERS} peers")
        token = self.verifier.join(request.peer_name, request.device, request.credentials)
        pid = peer_id(request.credentials.public_key)
        now = time.monotonic()
        with self.state.lock:
            old = self.state.peers.get(pid)
            if old is not None:  # a peer that restarts keeps its key; its counters start again from zero
                self.state.retired_env_steps += old.env_steps
            self.state.peers[pid] = PeerRecord(request.peer_name, request.device, now, now)
        logger.info("peer %s (%s) joined (%s)", request.peer_name, pid, request.device)
        return pb.JoinReply(run_config_json=self.state.run_config_json, bootstrap_maddrs=self.state.bootstrap_maddrs,
                            token=token)

    def renew_token(self, request: pb.RenewTokenRequest, context: grpc.ServicerContext) -> pb.TokenReply:
        return self.verifier.renew(request.peer_name, request.credentials)

    def submit_receipt(self, request: pb.SubmitReceiptRequest, context: grpc.ServicerContext
                       ) -> pb.SubmitReceiptReply:
        receipt = self.verifier.submit(request.receipt, request.signature)
        with self.state.lock:
            peer = self.state.peers.get(receipt.peer_id)
            if peer is not None:
                peer.last_seen = time.monotonic()
                if self.state.first_report is None:
                    self.state.first_report = peer.last_seen
                peer.epoch = receipt.epoch
                peer.env_steps += receipt.env_steps
                peer.samples += receipt.env_steps * self.verifier.config.update_epochs
                returns = [r for per_env in receipt.returns for r in per_env]
                if returns:
                    peer.mean_return = sum(returns) / len(returns)
                peer.samples_per_second = peer.samples / max(receipt.wall_s, 1e-3)
                for name in ("collect_s", "compute_s", "step_s", "average_s"):
                    peer.timings[name] = peer.timings.get(name, 0.0) + getattr(receipt, name)
                peer.timings["wall_s"] = receipt.wall_s
            return pb.SubmitReceiptReply(epoch=self.state.epoch)

    def register_reducer(self, request: pb.RegisterReducerRequest, context: grpc.ServicerContext
                         ) -> pb.RegisterReducerReply:
        self.verifier.register_reducer(request.credentials)
        with self.state.lock:
            known = list(self.state.bootstrap_maddrs)
            for maddr in request.maddrs:  # volunteers that join from now on follow it and may bootstrap from it
                if maddr not in self.state.bootstrap_maddrs:
                    self.state.bootstrap_maddrs.append(maddr)
                    logger.info("trusted reducer registered at %s", maddr)
        return pb.RegisterReducerReply(run_config_json=self.state.run_config_json, bootstrap_maddrs=known,
                                       owner_tag=self.state.owner_tag)

    def epoch_hash(self, request: pb.EpochHashRequest, context: grpc.ServicerContext) -> pb.EpochHashReply:
        return self.verifier.signed_hash(request.epoch)

    def status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        now = time.monotonic()
        board = [pb.PeerLedger(**row) for row in self.verifier.ledger.leaderboard()]
        with self.state.lock:
            s = self.state
            return pb.StatusReply(
                epoch=s.epoch, live_peers=len(s.live_peers(now)), samples_per_second=s.samples_per_second(now),
                env_steps=min(s.env_steps(), UINT64_MAX), has_eval=s.last_eval_return is not None,
                last_eval_return=s.last_eval_return or 0.0, last_eval_epoch=s.last_eval_epoch,
                uptime_s=now - s.started, peers=board, coordinator_key=self.verifier.identity.public_key,
            )


def _handler(method: str, fn):
    def handle(data: bytes, context: grpc.ServicerContext):
        try:
            request = parse_request(method, data)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return fn(request, context)
        except Refused as e:
            context.abort(e.code, str(e))

    kind = grpc.unary_stream_rpc_method_handler if method in STREAMING else grpc.unary_unary_rpc_method_handler
    return kind(handle, request_deserializer=None, response_serializer=lambda m: m.SerializeToString())


def start_server(state: SwarmState, verifier: Verifier, host: str, port: int, workers: int = 8
                 ) -> tuple[grpc.Server, int]:
    """Start the server; returns (server, bound port). Raises RuntimeError if the address cannot be bound."""
    service, store = CoordinatorService(state, verifier), CheckpointStore(state.checkpoints_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", MAX_TRANSPORT_BYTES)])
    methods = {"Join": service.join, "RenewToken": service.renew_token, "SubmitReceipt": service.submit_receipt,
               "EpochHash": service.epoch_hash, "RegisterReducer": service.register_reducer,
               "Status": service.status,
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
