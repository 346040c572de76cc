"""Verification and access: proof of key, tokens, receipt checks, audit sampling, strikes and bans.

The gRPC threads call join / renew / submit (cheap checks only); the main thread calls add_epoch after every
averaging round and pump between trusted-peer steps, which hands sampled receipts to the audit worker process,
applies the verdicts and runs the round check (round_check.py). Everything shared sits behind one lock.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from hivegym.coordinator.audit import PARAMS_RTOL, audit_receipt, sketch_distance
from hivegym.coordinator.ledger import Duplicate, Ledger
from hivegym.coordinator.round_check import RoundCheck
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity, peer_id, verify
from hivegym.protocol.work import sketch, sketch_seed
from hivegym.protocol.receipt import (RECEIPT_PREFIX, Receipt, ReceiptError, Token, decode_receipt, epoch_hash_message,
                                      join_message)

logger = logging.getLogger(__name__)

CLOCK_SKEW_S = 60.0  # a Join/RenewToken timestamp may be this far from the coordinator's clock
MAX_QUEUED_AUDITS_PER_PEER = 100
REDUCER_NAME = "reducer"  # the name in a reducer's credentials
RATE_SLACK_S = 5.0  # seconds of work a peer may claim beyond its time since joining
_random = secrets.SystemRandom()  # peers must not predict which receipts are audited


class Refused(Exception):
    """A request that is answered with this gRPC status and message, and changes nothing."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class PendingAudit:
    peer_id: str
    public_key: bytes
    receipt: Receipt
    epoch: int = -1  # the kept epoch whose parameters the replay uses


class Verifier:
    def __init__(self, config: RunConfig, identity: Identity, ledger: Ledger,
                 publish_access: Callable[[str, float], None], publish_ban: Callable[[str], None]):
        self.config, self.identity, self.ledger = config, identity, ledger
        self.publish_access, self.publish_ban = publish_access, publish_ban
        self.lock = threading.Lock()
        self.history: dict[int, dict] = {}  # epoch -> parameters right after the round that began it
        self.hashes: dict[int, str] = {}  # epoch -> sha256 of those parameters
        self.sketches: dict[int, list[float]] = {}  # epoch -> sketch of those parameters
        self.seen: dict[tuple[bytes, float], float] = {}  # (key, timestamp) of credentials -> when it may be forgotten
        self.claimed: dict[str, tuple[float, int]] = {}  # peer id -> (joined, env steps claimed since)
        self.expires: dict[str, float] = {}  # peer id -> when its latest token expires (unix seconds)
        self.refusals: dict[str, dict[str, int]] = {}  # peer id ("?" if unreadable) -> gRPC code -> receipts refused
        self.queues: dict[str, deque[PendingAudit]] = {}  # peer id -> its sampled receipts, oldest first
        self.audits_started: dict[str, int] = {}  # peer id -> audits handed to the worker
        self.running: list[tuple[Future, PendingAudit]] = []
        self.rounds = RoundCheck(ledger, self._strike)
        self.epoch = 0

    # ---- access -------------------------------------------------------------------------------------------
    def check_credentials(self, peer_name: str, credentials: pb.Credentials) -> str:
        """The caller's peer id if it proved its key with a fresh, unused timestamp; raises Refused."""
        now = time.time()
        if abs(now - credentials.timestamp) > CLOCK_SKEW_S:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "credentials timestamp is "
                          f"{now - credentials.timestamp:+.0f} s from the coordinator's clock (limit "
                          f"{CLOCK_SKEW_S:.0f} s); check this machine's clock")
        message = join_message(self.identity.public_key, peer_name, credentials.libp2p_id, credentials.timestamp)
        if not verify(credentials.public_key, message, credentials.signature):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "credentials signature does not verify with public_key")
        key = (credentials.public_key, credentials.timestamp)
        with self.lock:
            self.seen = {k: t for k, t in self.seen.items() if t > now}
            if key in self.seen:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "these credentials were used before (replayed)")
            self.seen[key] = now + 2 * CLOCK_SKEW_S
        return peer_id(credentials.public_key)

    def join(self, peer_name: str, device: str, credentials: pb.Credentials) -> pb.TokenReply:
        pid = self.check_credentials(peer_name, credentials)
        self._refuse_banned(pid)
        self.ledger.add_peer(pid, credentials.public_key, peer_name, device, time.time())
        with self.lock:
            self.claimed[pid] = (time.monotonic(), 0)
        return self._token(pid, credentials.public_key, "")

    def renew(self, peer_name: str, credentials: pb.Credentials) -> pb.TokenReply:
        pid = self.check_credentials(peer_name, credentials)
        peer = self.ledger.peer(pid)
        if peer is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "unknown key: Join first")
        self._refuse_banned(pid)
        self.ledger.set_libp2p_id(pid, credentials.libp2p_id)
        reply = self._token(pid, credentials.public_key, credentials.libp2p_id)
        self.publish_access(credentials.libp2p_id, time.time() + self.config.token_ttl)
        return reply

    def register_reducer(self, credentials: pb.Credentials) -> None:
        """An extra trusted reducer proves the coordinator's own key; with its hivemind id it gets access."""
        if credentials.public_key != self.identity.public_key:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "only the coordinator's own key registers reducers")
        self.check_credentials(REDUCER_NAME, credentials)
        if credentials.libp2p_id:
            self.publish_access(credentials.libp2p_id, time.time() + self.config.token_ttl)

    def _token(self, pid: str, public_key: bytes, libp2p_id: str) -> pb.TokenReply:
        token = Token(self.config.run_id, pid, public_key, libp2p_id, time.time() + self.config.token_ttl)
        with self.lock:
            self.expires[pid] = token.expires
        data, signature = token.sign(self.identity)
        return pb.TokenReply(token=data, token_signature=signature)

    def _refuse_banned(self, pid: str) -> None:
        peer = self.ledger.peer(pid)
        if peer is not None and peer["banned"]:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"peer {pid} is banned: {peer['ban_reason']}")

    # ---- receipts -----------------------------------------------------------------------------------------
    def submit(self, data: bytes, signature: bytes) -> Receipt:
        """Check and store a receipt; maybe sample it for an audit. Raises Refused (nothing stored)."""
        try:
            receipt = decode_receipt(data)
        except ReceiptError as e:
            self._count_refusal("?", grpc.StatusCode.INVALID_ARGUMENT)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            return self._submit(receipt, data, signature)
        except Refused as e:
            self._count_refusal(receipt.peer_id, e.code)
            raise

    def _count_refusal(self, pid: str, code: grpc.StatusCode) -> None:
        with self.lock:
            per_peer = self.refusals.setdefault(pid, {})
            per_peer[code.name] = per_peer.get(code.name, 0) + 1

    def _submit(self, receipt: Receipt, data: bytes, signature: bytes) -> Receipt:
        peer = self.ledger.peer(receipt.peer_id)
        if peer is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"unknown peer {receipt.peer_id}: Join first")
        if not verify(peer["public_key"], RECEIPT_PREFIX + data, signature):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "receipt signature does not verify with this peer's key")
        if peer["banned"]:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"peer {receipt.peer_id} is banned: {peer['ban_reason']}")
        self._check_fields(receipt)
        now = time.monotonic()
        with self.lock:
            if self.expires.get(receipt.peer_id, 0.0) < time.time():
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"the token of peer {receipt.peer_id} has expired: "
                              "RenewToken first")
            epoch = self.epoch
            joined, claimed = self.claimed.get(receipt.peer_id, (now, 0))
        if receipt.epoch > epoch + 1:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"epoch {receipt.epoch} is in the future (swarm: {epoch})")
        if receipt.epoch + self.config.params_history < epoch:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"epoch {receipt.epoch} is too old to audit (swarm: {epoch}, "
                          f"kept: {self.config.params_history})")
        self._check_params(receipt)
        if claimed + receipt.env_steps > (now - joined + RATE_SLACK_S) * self.config.max_env_steps_per_second:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{claimed + receipt.env_steps} env steps since joining "
                          f"{now - joined:.0f} s ago is more than max_env_steps_per_second allows")
        accepted, passed = self.ledger.receipt_counts(receipt.peer_id)
        # a peer whose sampled receipts could not be replayed yet (audits behind) has earned no trust
        new = accepted < self.config.new_peer_receipts or passed == 0 or peer["strikes"] > 0
        rate = self.config.audit_rate_new if new else self.config.audit_rate
        audit = _random.random() < rate
        try:
            self.ledger.add_receipt(receipt.peer_id, receipt.epoch, receipt.batch, receipt.env_steps,
                                    receipt.collect_s + receipt.compute_s, time.time(), data, signature,
                                    "pending" if audit else None)
        except Duplicate as e:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        dropped = None
        with self.lock:
            self.claimed[receipt.peer_id] = (joined, claimed + receipt.env_steps)
            if audit:
                queue = self.queues.setdefault(receipt.peer_id, deque())
                if len(queue) >= MAX_QUEUED_AUDITS_PER_PEER:
                    dropped = queue.popleft()
                queue.append(PendingAudit(receipt.peer_id, peer["public_key"], receipt))
        if dropped is not None:
            self._verdict(dropped, "skipped", "more of the peer's receipts were waiting for an audit than are kept")
        return receipt

    def _check_params(self, r: Receipt) -> None:
        """The parameters a batch was collected with must be those of its epoch (labels of peers that averaged
        together can differ by one). Checked once the coordinator holds that epoch; a receipt for a newer one is
        matched when it is audited."""
        with self.lock:
            if r.epoch > max(self.sketches, default=-1):
                return
            distances = {e: sketch_distance(r.params_sketch, s) for e, s in self.sketches.items()}
        nearest = min(distances, key=distances.get)
        if distances[nearest] <= PARAMS_RTOL and nearest >= r.epoch - 1:
            return  # a newer epoch's parameters under an older label gain a cheater nothing: replays still match
        if distances[nearest] <= PARAMS_RTOL:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"the batch was collected with the parameters of epoch "
                          f"{nearest}, not of epoch {r.epoch}")
        self.rounds.note_drift(r.peer_id, r.epoch)
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the parameters of this batch match no epoch of the "
                      f"swarm near {r.epoch} (a failed averaging round?): reload the swarm's state")

    def _check_fields(self, r: Receipt) -> None:
        c = self.config
        problems = []
        if r.run_id != c.run_id:
            problems.append(f"run_id is {r.run_id!r}, this run is {c.run_id!r}")
        if r.env_steps != c.rollout_size:
            problems.append(f"env_steps must be {c.rollout_size} (num_envs * rollout_steps), got {r.env_steps}")
        if len(r.actions) != c.num_envs or len(r.returns) != c.num_envs:
            problems.append(f"actions and returns must have {c.num_envs} env streams")
        if any(len(per_env) > c.rollout_steps for per_env in r.returns):
            problems.append("more episodes in an env stream than steps")
        if len(r.params_sketch) != c.sketch_dim or len(r.update_sketch) != c.sketch_dim:
            problems.append(f"sketches must have {c.sketch_dim} entries")
        if max(r.collect_s, r.compute_s, r.step_s) > r.wall_s + 1.0 or r.average_s > r.step_s + 1e-6:
            problems.append("timings are inconsistent (a part exceeds its whole)")
        if problems:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))

    # ---- epochs and audits (main thread) ------------------------------------------------------------------
    def add_epoch(self, epoch: int, state: dict, params_hash: str) -> None:
        params = torch.cat([v.reshape(-1) for v in state.values()])
        params_sketch = sketch(params, self.config.sketch_dim, sketch_seed(self.config.run_id))
        with self.lock:
            self.epoch = epoch
            self.history[epoch], self.hashes[epoch], self.sketches[epoch] = state, params_hash, params_sketch
            for old in [e for e in self.history if e < epoch - self.config.params_history - 1]:
                del self.history[old], self.hashes[old], self.sketches[old]
        self.rounds.forget_before(epoch - self.config.params_history - 1)

    def set_epoch(self, epoch: int) -> None:
        with self.lock:
            self.epoch = max(self.epoch, epoch)

    def signed_hash(self, epoch: int) -> pb.EpochHashReply:
        with self.lock:
            params_hash = self.hashes.get(epoch)
        if params_hash is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no parameters kept for epoch {epoch}")
        signature = self.identity.sign(epoch_hash_message(self.config.run_id, epoch, params_hash))
        return pb.EpochHashReply(epoch=epoch, params_hash=params_hash, signature=signature)

    def pump(self, pool: ProcessPoolExecutor, parallel: int = 4) -> None:
        """Apply finished audits and hand queued ones to the pool (at most `parallel` waiting there at a time);
        check what peers sent into finished rounds."""
        self.rounds.check()
        for future, job in [(f, j) for f, j in self.running if f.done()]:
            self.running.remove((future, job))
            try:
                verdict, detail = future.result()
            except BrokenProcessPool:
                self._requeue(job)  # audited again by the next pool
                continue
            except Exception as e:  # a crashed replay is our fault, not the peer's: no strike
                logger.error("audit of %s epoch %d batch %d crashed: %r", job.peer_id, job.receipt.epoch,
                             job.receipt.batch, e)
                continue
            self._verdict(job, verdict, detail)
        while len(self.running) < parallel and (job := self._next_job()) is not None:
            with self.lock:
                sketches = dict(self.sketches)
            epoch, detail = self._matching_epoch(job.receipt, sketches)
            if epoch is None:
                self._verdict(job, detail[0], detail[1])
                continue
            with self.lock:
                state = self.history.get(epoch)
                job.epoch = epoch
            if state is None:
                continue
            try:
                future = pool.submit(audit_receipt, self.config.to_json(), job.public_key, job.receipt, state)
            except BrokenProcessPool:  # the worker died (memory, a signal): the caller starts a new pool
                self._requeue(job)
                raise
            self.running.append((future, job))

    def _next_job(self) -> PendingAudit | None:
        """The newest sampled receipt of the peer with the fewest audits so far: when audits fall behind, one
        busy peer's backlog must not starve the others, and a newest receipt's epoch is still kept."""
        with self.lock:
            waiting = [pid for pid, queue in self.queues.items() if queue]
            if not waiting:
                return None
            pid = min(waiting, key=lambda p: self.audits_started.get(p, 0))
            self.audits_started[pid] = self.audits_started.get(pid, 0) + 1
            return self.queues[pid].pop()

    def _requeue(self, job: PendingAudit) -> None:
        with self.lock:
            self.audits_started[job.peer_id] -= 1
            self.queues[job.peer_id].append(job)

    def _matching_epoch(self, r: Receipt, sketches: dict[int, list[float]]) -> tuple[int | None, tuple[str, str]]:
        """The kept epoch whose parameters the receipt's sketch names, or None and the verdict without a replay:
        'failed' if they are an older epoch's (a stale batch sold as new), 'unmatched' if they are no epoch's (a peer
        off the swarm's parameters after a failed round: its work is not credited, but that is no proof of cheating)."""
        if r.epoch < min(sketches, default=0) - 1:
            return None, ("skipped", "its epoch was no longer kept when its turn came (audits fell behind)")
        distances = {e: sketch_distance(r.params_sketch, s) for e, s in sketches.items()}
        nearest = min(distances, key=distances.get, default=None)
        if nearest is not None and distances[nearest] <= PARAMS_RTOL:
            if nearest >= r.epoch - 1:
                return nearest, ("", "")
            return None, ("failed", f"the batch was collected with the parameters of epoch {nearest}, claimed as "
                                    f"epoch {r.epoch}")
        return None, ("unmatched", "its parameters match no kept epoch (relative distance "
                                   f"{distances.get(nearest, float('inf')):.2g}); not credited")

    def _verdict(self, job: PendingAudit, verdict: str, detail: str) -> None:
        r = job.receipt
        if verdict == "skipped":
            logger.warning("audit of %s epoch %d batch %d skipped: %s", job.peer_id, r.epoch, r.batch, detail)
        strikes = self.ledger.record_audit(job.peer_id, r.epoch, r.batch, verdict, detail)
        if verdict != "failed":
            logger.debug("audit of %s epoch %d batch %d %s: %s", job.peer_id, r.epoch, r.batch, verdict, detail)
            return
        logger.warning("audit of %s epoch %d batch %d FAILED (strike %d): %s", job.peer_id, r.epoch, r.batch,
                       strikes, detail)
        self._ban_past_threshold(job.peer_id, strikes, detail)

    def _strike(self, pid: str, detail: str) -> None:
        strikes = self.ledger.strike(pid)
        logger.warning("peer %s: strike %d: %s", pid, strikes, detail)
        self._ban_past_threshold(pid, strikes, detail)

    def _ban_past_threshold(self, pid: str, strikes: int, detail: str) -> None:
        peer = self.ledger.peer(pid)
        if strikes < self.config.strikes_to_ban or peer["banned"]:
            return
        reason = f"{strikes} strikes; last: {detail}"
        self.ledger.ban(pid, reason)
        logger.warning("peer %s (%s) is banned: %s", pid, peer["name"], reason)
        if peer["libp2p_id"]:
            self.publish_ban(peer["libp2p_id"])

    def idle(self) -> bool:
        return not any(self.queues.values()) and not self.running

