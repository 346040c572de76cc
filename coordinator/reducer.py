"""What makes a hivemind peer a trusted reducer: robust aggregation and access control inside its averagers,
and the coordinator's signed access and ban records in the DHT.

hivemind 1.1.12 guards only the DHT's RPCs with its authorizer; the averagers' RPCs (joining a group, sending
parts, downloading state) are open to any libp2p peer. install() patches them, in this process, before the
averagers fork: a caller needs an unexpired access record and no ban record, both stored by the coordinator
under its owner tag (RSASignatureValidator signs them; the SchemaValidator makes both keys dictionaries whose
subkeys must carry the coordinator's tag, so nobody else can add, replace or wipe them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from typing import Dict

import torch
from hivemind.averaging import allreduce, averager
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator, conbytes
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from pydantic.v1 import StrictBool, StrictFloat, create_model

logger = logging.getLogger(__name__)

CLIP_ITERATIONS = 3
ACCESS_CACHE_S = 1.0  # an averager re-reads a caller's records at most this often


def owner_tag() -> bytes:
    """This process's hivemind record-signing tag (its process-wide RSA key, shared with the progress tracker)."""
    return RSASignatureValidator().local_public_key


def validators(run_id: str, tag: bytes) -> list:
    """Record validators for a trusted DHT node: signatures, and the strict schema of the access records."""
    owned = conbytes(regex=b"^[1-9A-HJ-NP-Za-km-z]{30,64}" + re.escape(tag) + b"$")

    # access: subkey libp2p id + tag, value the unix time its token expires; bans: subkey libp2p id + tag, value True
    schema = create_model("AccessSchema", access=(Dict[owned, StrictFloat], None), bans=(Dict[owned, StrictBool], None))
    return [RSASignatureValidator(), SchemaValidator(schema, prefix=run_id)]


def subkey(libp2p_id: str, tag: bytes) -> bytes:
    return libp2p_id.encode() + tag


def centered_clip(parts: list[torch.Tensor], weights: list[float] | None = None,
                  iterations: int = CLIP_ITERATIONS) -> torch.Tensor:
    """Weighted CenteredClip (Karimireddy et al., 2021) from the coordinate-wise median, with the clipping radius set
    to the median distance of the inputs from it: inputs of total weight share s can move the result by at most
    about s times the radius per iteration. Inputs within the radius give their weighted mean. Two inputs give their
    weighted mean (with two there is no majority to trust). weights: one per part, not all zero (None: equal)."""
    x = torch.stack(parts)  # [m, n]
    w = torch.ones(len(parts)) if weights is None else torch.tensor(weights, dtype=torch.float32)  # [m]
    w = w / w.sum()
    if len(parts) <= 2:
        return (w[:, None] * x).sum(0)
    v = x.median(0).values  # [n]
    tau = (x - v).norm(dim=1).median()
    for _ in range(iterations):
        diff = x - v  # [m, n]
        scale = (tau / diff.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)  # [m]
        v = v + ((w * scale)[:, None] * diff).sum(0)
    return v


def round_weights(reported: list[float], cap: float) -> list[float]:
    """The weights a reducer uses: each sender's self-reported sample count, capped at `cap` (a round's samples),
    so no sender outweighs a whole round; all zero or invalid: equal weights (never a zero total)."""
    weights = [min(w, cap) if math.isfinite(w) and w > 0 else 0.0 for w in reported]
    return weights if sum(weights) > 0 else [1.0] * len(reported)


class RobustReducer(TensorPartReducer):
    """hivemind's reducer with each part's average replaced by centered_clip over the senders, each weighted by the
    samples it reports for the round (hivemind's weight), capped at the round's target (round_weights).

    When this reducer gets every part of the vector (it is the only reducer) and install() was given a sketch
    spec, it also projects what each sender sent onto the receipts' sketch directions and puts
    {sender's hivemind id: sketch} on the queue, so that the coordinator can compare it with the sender's
    receipts (the projection of a sum is the sum of the projections)."""

    sender_ids: list[str] = []  # set by the all-reduce runner (see install)

    def reset_accumulators(self):
        if not hasattr(self, "offset"):
            self.offset, self.total = 0, sum(shape.numel() for shape in self.part_shapes)
            self.sent: dict[int, torch.Tensor] = {}
        elif self.parts:
            self._project()
        self.parts: list[tuple[int, torch.Tensor, float]] = []
        super().reset_accumulators()

    def _project(self) -> None:
        """Add the finished part of every sender to its running sketch (only when the whole vector passes here)."""
        spec = _sketch_spec
        if spec is None or self.total != spec[2]:
            return
        size = self.parts[0][1].numel()
        directions = _directions()[:, self.offset:self.offset + size]  # [dim, size]
        for sender, part, _ in self.parts:
            self.sent[sender] = self.sent.get(sender, 0) + directions @ part.reshape(-1)
        self.offset += size
        if self.offset == self.total and self.sender_ids and _sent_queue is not None:
            _sent_queue.put({self.sender_ids[i]: v.tolist() for i, v in self.sent.items()})

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # hivemind's accumulate_part, storing the part instead of summing it
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise allreduce.AllreduceException("attempted to aggregate part in a finalized reducer")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.parts.append((sender_index, tensor_part.float(), weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders:
            if self.parts:
                weights = round_weights([w for _, _, w in self.parts], _max_weight)
                self.current_part_future.set_result(centered_clip([p for _, p, _ in self.parts], weights))
            else:
                self.current_part_future.set_result(self.accumulator)
            self.reset_accumulators()


class AccessGuard:
    """Answers 'may this libp2p peer use my averager?' from the coordinator's records in the DHT."""

    def __init__(self, run_id: str, tag: bytes):
        self.run_id, self.tag = run_id, tag
        self.cache: dict[str, tuple[bool, float]] = {}

    async def allowed(self, dht, remote_id) -> bool:
        name, now = remote_id.to_base58(), time.monotonic()
        hit = self.cache.get(name)
        if hit is not None and now - hit[1] < ACCESS_CACHE_S:
            return hit[0]
        key = subkey(name, self.tag)
        access = await dht.get(f"{self.run_id}_access", latest=True, return_future=True)
        bans = await dht.get(f"{self.run_id}_bans", latest=True, return_future=True)
        record = access.value.get(key) if access is not None and isinstance(access.value, dict) else None
        ok = record is not None and record.value > time.time() and record.expiration_time > get_dht_time()
        if ok and bans is not None and isinstance(bans.value, dict) and key in bans.value:
            ok = False
        self.cache[name] = (ok, now)
        if not ok:
            logger.info("refused averager access to %s (no valid token, or banned)", name)
        return ok


_guard: AccessGuard | None = None
_original = {}
_sketch_spec: tuple[int, int, int] | None = None  # (dim, seed, number of parameters)
_max_weight = float("inf")  # a sender's weight counts at most this (samples)
_sent_queue = None
_projection: list[torch.Tensor] = []


def _directions() -> torch.Tensor:
    if not _projection:  # the same matrix as protocol.work.sketch
        dim, seed, size = _sketch_spec
        _projection.append(torch.randn(dim, size, generator=torch.Generator().manual_seed(seed)))
    return _projection[0]


def install(run_id: str, tag: bytes, sketch_spec: tuple[int, int, int] | None = None, sent_queue=None,
            max_weight: float = float("inf")) -> None:
    """Make every averager created after this in this process a trusted reducer (robust, access-controlled).
    sketch_spec (dim, seed, parameters) and sent_queue: report the sketch of what each sender sent (see
    RobustReducer). max_weight: the cap on a sender's self-reported weight (the round's target samples)."""
    global _guard, _sketch_spec, _sent_queue, _max_weight
    _guard = AccessGuard(run_id, tag)
    _sketch_spec, _sent_queue, _max_weight = sketch_spec, sent_queue, max_weight
    allreduce.TensorPartReducer = RobustReducer
    if _original:
        return
    runner_init = allreduce.AllReduceRunner.__init__

    def init_runner(self, *args, **kwargs):
        runner_init(self, *args, **kwargs)
        self.tensor_part_reducer.sender_ids = [peer.to_base58() for peer in self.sender_peer_ids]

    allreduce.AllReduceRunner.__init__ = init_runner
    _original.update(join=averager.DecentralizedAverager.rpc_join_group,
                     part=averager.DecentralizedAverager.rpc_aggregate_part,
                     download=averager.DecentralizedAverager.rpc_download_state)

    @functools.wraps(_original["join"])
    async def rpc_join_group(self, request, context):
        if not await _guard.allowed(self.dht, context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in _original["join"](self, request, context):
            yield message

    @functools.wraps(_original["part"])
    async def rpc_aggregate_part(self, stream, context):
        if not await _guard.allowed(self.dht, context.remote_id):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in _original["part"](self, stream, context):
            yield message

    @functools.wraps(_original["download"])
    async def rpc_download_state(self, _request, _context):
        if not await _guard.allowed(self.dht, _context.remote_id):
            return
        async for message in _original["download"](self, _request, _context):
            yield message

    averager.DecentralizedAverager.rpc_join_group = rpc_join_group
    averager.DecentralizedAverager.rpc_aggregate_part = rpc_aggregate_part
    averager.DecentralizedAverager.rpc_download_state = rpc_download_state
