"""A volunteer's session: join the coordinator, enter the swarm, train until stopped."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from hivegym.peer import swarm
from hivegym.peer.preflight import preflight
from hivegym.peer.worker import BatchResult, Epoch, Progress, do_batch
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import ConfigError, RunConfig
from hivegym.protocol.identity import Identity, IdentityError, verify
from hivegym.protocol.policy import build_policy
from hivegym.protocol.receipt import Receipt, ReceiptError, epoch_hash_message, join_message, verify_token
from hivegym.protocol.rollout import Collector
from hivegym.protocol.rpc import CoordinatorClient, describe_error
from hivegym.protocol.shutdown import stop_on_signals
from hivegym.protocol.work import batch_seeds, params_hash, sketch, sketch_seed

logger = logging.getLogger(__name__)
AHEAD_REPORTS = 5
RENEW_POLL_S = 0.5  # how often the renewal thread checks whether the token is due
RENEW_RETRY_S = 2.0  # after a failed renewal
SHUTDOWN_DEADLINE_S = 6.0  # after a stop signal: the coordinator kills its local peers' groups at 8 s


class JoinFailed(RuntimeError):
    """The peer cannot start; the message is one line that says what to do."""


class Stopped(Exception):
    """Raised inside the loop once a stop was asked for, so a long PPO pass ends at the next step."""


@dataclass
class VolunteerOptions:
    coordinator: str
    """HOST:PORT of the coordinator's gRPC server."""
    coordinator_key: bytes | None
    """The coordinator's Ed25519 public key from the join string (None: trust the one it sends, with a warning)."""
    identity: Path
    """This peer's Ed25519 key file (created, mode 0600, if missing)."""
    name: str
    """This peer's name in the swarm (letters, digits, '.', '_', '-')."""
    device: str
    """'auto', 'cpu', 'cuda' or 'mps'."""
    client_mode: bool
    """Run hivemind as a client: no incoming connections, never reduces (the default for volunteers)."""
    max_minutes: float | None
    """Stop after this many minutes (None: until stopped)."""
    live_status: bool
    """Rewrite one status line in place (a terminal) instead of logging a line every 10 s."""
    save_params: str | None = None
    """Write the parameters held right after each of the last few global steps here ({epoch: state_dict})."""
    host_maddrs: tuple[str, ...] = ()
    """libp2p listen addresses (default /ip4/127.0.0.1/tcp/0; a full peer on another host needs a public one)."""
    announce_maddrs: tuple[str, ...] = ()
    """libp2p addresses announced to others (a public address in front of this one)."""
    use_relay: bool = True
    """Reach peers behind NAT through circuit relays."""
    auto_relay: bool = False
    """Behind NAT: reserve a slot at a relay (the bootstrap peers) and announce it, to be reachable."""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise JoinFailed("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(requested)


def minibatch_for(device: torch.device, config: RunConfig) -> int:
    """Samples per step: the run's minibatch on a CPU, the whole rollout on an accelerator. The swarm counts
    samples, so a slower device simply contributes fewer of them per epoch and holds nobody back."""
    return config.minibatch_size if device.type == "cpu" else config.rollout_size


def run(options: VolunteerOptions) -> int:
    device = pick_device(options.device)
    try:
        identity = Identity.load_or_create(options.identity)
    except IdentityError as e:
        raise JoinFailed(str(e)) from None
    # the run's own timeouts arrive with Join; until then the config's defaults apply
    client = CoordinatorClient(options.coordinator, RunConfig.rpc_timeout, RunConfig.rpc_retries)
    p2p = dict(host_maddrs=list(options.host_maddrs) or None, announce_maddrs=list(options.announce_maddrs) or None,
               use_relay=options.use_relay, use_auto_relay=options.auto_relay)
    session = Session(client, identity, options.name, options.coordinator_key)
    reply, failures = preflight(client, lambda: session.join(device.type), p2p)
    if failures:
        client.close()
        raise JoinFailed("\n".join(failures))  # one line per failed check
    try:
        config = RunConfig.from_json(reply.run_config_json)
    except (ConfigError, TypeError) as e:
        raise JoinFailed(f"the coordinator sent a run config this hivegym cannot use ({e}); upgrade hivegym")
    client.timeout, client.retries = config.rpc_timeout, config.rpc_retries
    session.config = config
    logger.info("joined as peer %s (key %s)", identity.peer_id, options.identity)

    dht = opt = renewer = None
    try:
        leaders = swarm.peer_ids(list(reply.bootstrap_maddrs))  # the coordinator's trusted peer
        if not leaders:
            raise JoinFailed(f"the coordinator's bootstrap addresses {list(reply.bootstrap_maddrs)} name no hivemind "
                             "peer id (/p2p/...); upgrade the coordinator")
        swarm.follow_only(leaders)
        try:
            dht = swarm.start_dht(list(reply.bootstrap_maddrs), client_mode=options.client_mode, **p2p)
        except Exception as e:
            raise JoinFailed(f"cannot reach the swarm's bootstrap peers {list(reply.bootstrap_maddrs)} ({e}); "
                             "check that their ports are reachable from here") from None
        session.libp2p_id = dht.peer_id.to_base58()
        logger.info("hivemind peer id %s", session.libp2p_id)
        session.renew()  # binds the token to this hivemind peer id: the trusted peers admit it from now on
        policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed).to(device)
        opt = swarm.make_optimizer(dht, policy, config, client_mode=options.client_mode)
        # renewed in the background from here (the averagers have forked): waiting for a reducer and downloading
        # the state can outlast a short token_ttl on a loaded machine, and a lapsed token is refused the state
        renewer = TokenRenewer(session)
        if not swarm.wait_for_reducer(opt, timeout=config.load_state_timeout):
            raise JoinFailed("no trusted peer of the swarm answered within load_state_timeout; is the coordinator "
                             "still running?")
        if opt.tracker.global_epoch > 0:  # late joiner: start from the swarm's parameters, not from scratch
            load_verified_state(opt, policy, session, config.load_state_timeout)
        # handlers go in after hivemind's processes have forked, so SIGTERM still ends those at once
        stop = threading.Event()
        stop_on_signals(stop, SHUTDOWN_DEADLINE_S)
        train(options, config, session, opt, policy, device, stop)
        return 0
    finally:
        if renewer is not None:
            renewer.stop()
        swarm.shutdown(opt, dht)
        client.close()


class Session:
    """This peer's standing with the coordinator: its key, its token (renewed at half its lifetime), receipts."""

    def __init__(self, client: CoordinatorClient, identity: Identity, name: str, coordinator_key: bytes | None):
        self.client, self.identity, self.name = client, identity, name
        self.coordinator_key = coordinator_key
        self.config: RunConfig | None = None
        self.libp2p_id = ""
        self.token_expires = 0.0
        self.renew_at = 0.0

    def credentials(self) -> pb.Credentials:
        now = time.time()
        message = join_message(self.coordinator_key, self.name, self.libp2p_id, now)
        return pb.Credentials(public_key=self.identity.public_key, libp2p_id=self.libp2p_id, timestamp=now,
                              signature=self.identity.sign(message))

    def join(self, device: str) -> pb.JoinReply:
        if self.coordinator_key is None:
            self.coordinator_key = self.client.status().coordinator_key
            logger.warning("the join string carries no coordinator key; trusting the key the coordinator sent (%s)",
                           self.coordinator_key.hex()[:16])
        reply = self.client.join(self.name, device, self.credentials())
        self._accept(reply.token)
        return reply

    def renew(self) -> None:
        self._accept(self.client.renew_token(self.name, self.credentials()))

    def _accept(self, reply: pb.TokenReply) -> None:
        try:
            token = verify_token(reply.token, reply.token_signature, self.coordinator_key)
        except ReceiptError as e:
            raise JoinFailed(f"the coordinator's token is not valid ({e}); is this the coordinator of the join "
                             "string?") from None
        self.token_expires = token.expires
        self.renew_at = time.time() + (token.expires - time.time()) / 2

    def renew_if_due(self) -> None:
        if time.time() >= self.renew_at:
            try:
                self.renew()
            except grpc.RpcError as e:
                logger.warning("token renewal failed (%s); retrying", describe_error(e))
                self.renew_at = time.time() + RENEW_RETRY_S
            except JoinFailed as e:  # a token that does not verify: the next renewal may bring a good one
                logger.warning("%s; retrying", e)
                self.renew_at = time.time() + RENEW_RETRY_S

    def submit(self, receipt: Receipt) -> tuple[int | None, bool]:
        """Hand in a receipt; returns (the coordinator's epoch or None if it did not answer, whether this peer's
        parameters have left the swarm's and it must reload). Other refusals are logged."""
        data, signature = receipt.sign(self.identity)
        try:
            return self.client.submit_receipt(data, signature).epoch, False
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise JoinFailed(f"the coordinator banned this peer: {describe_error(e)}") from None
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None, False
            logger.warning("receipt for epoch %d batch %d refused: %s", receipt.epoch, receipt.batch,
                           describe_error(e))
            return None, e.code() == grpc.StatusCode.FAILED_PRECONDITION


class TokenRenewer:
    """Renews the session's token at half its lifetime: a daemon thread that calls session.renew_if_due() every
    RENEW_POLL_S seconds, until stop() (which joins it)."""

    def __init__(self, session: Session):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(session,), name="token-renewal", daemon=True)
        self._thread.start()

    def _run(self, session: Session) -> None:
        while not self._stopped.wait(RENEW_POLL_S):
            session.renew_if_due()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopped.set()
        self._thread.join(timeout)


def load_verified_state(opt, policy: torch.nn.Module, session: Session, timeout: float) -> None:
    """Download the swarm's state and check it against the hash the coordinator signed for its epoch, retrying for
    `timeout` seconds (load_state_timeout). Trusted peers serve each epoch's starting parameters under its number;
    hivemind relabels a download one epoch ahead while a round is ending (catching up), and a download can fail
    on a loaded machine, so a mismatch is retried, not fatal."""
    deadline = time.monotonic() + timeout
    while True:
        opt.load_state_from_peers()
        if signed_hash(session, opt.local_epoch) == params_hash(policy):
            logger.info("loaded the swarm's state at epoch %d (hash checked)", opt.local_epoch)
            return
        if time.monotonic() >= deadline:
            raise JoinFailed(f"could not download a swarm state that matches the coordinator's signed hash within "
                             f"load_state_timeout ({timeout:g} s); is the coordinator's trusted peer overloaded?")
        logger.warning("the state downloaded at epoch %d matches no hash the coordinator signed; retrying",
                       opt.local_epoch)
        time.sleep(1.0)


def signed_hash(session: Session, epoch: int, wait_s: float = 5.0) -> str | None:
    """The coordinator's signed hash of an epoch's parameters; it may record the newest epoch a moment after a
    peer can download it, so NOT_FOUND is retried for wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = session.client.epoch_hash(epoch)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            logger.debug("no hash of epoch %d from the coordinator: %s", epoch, describe_error(e))
            return None
        message = epoch_hash_message(session.config.run_id, epoch, reply.params_hash)
        if verify(session.coordinator_key, message, reply.signature):
            return reply.params_hash
        logger.warning("the coordinator's hash of epoch %d carries a bad signature", epoch)
        return None


def make_receipt(session: Session, result: BatchResult, epoch: Epoch, wall_s: float) -> Receipt:
    config = session.config
    rollout = result.work.rollout
    return Receipt(
        run_id=config.run_id, peer_id=session.identity.peer_id, epoch=result.epoch, batch=result.batch,
        env_steps=len(result.work.batch), returns=rollout.env_returns, actions=rollout.action_digests(),
        params_hash=epoch.hash, params_sketch=epoch.sketch,
        update_sketch=sketch(result.work.update, config.sketch_dim, sketch_seed(config.run_id)),
        collect_s=result.collect_s, compute_s=result.compute_s, step_s=result.step_s, average_s=result.average_s,
        wall_s=wall_s)


def train(options: VolunteerOptions, config: RunConfig, session: Session, opt, policy, device, stop) -> None:
    collector = Collector(config.env_id, config.num_envs, 0)
    progress, start = Progress(), time.monotonic()
    deadline = start + options.max_minutes * 60 if options.max_minutes else float("inf")
    epoch = Epoch(policy, opt.local_epoch, config)
    # {epoch: parameters right after the step that reached it}; the first entry is the starting state
    snapshots = {opt.local_epoch: _cpu_copy(policy)}
    if options.save_params:
        _save_atomically(snapshots, options.save_params)
    shown = 0.0
    reporting = True  # False while the coordinator does not answer; logged once per outage
    ahead = 0  # consecutive receipts in which this peer's epoch was past the coordinator's
    used: dict[int, int] = {}  # epoch -> batches done in it (a receipt's (epoch, batch) must never repeat)

    def step(samples: int) -> int | None:
        if stop.is_set():
            raise Stopped
        new_epoch = swarm.step(opt, samples)
        if progress.batches == 0:
            logger.info("contributed a first gradient")
        if new_epoch is not None and options.save_params:  # right after a global step
            snapshots[new_epoch] = _cpu_copy(policy)
            for old in sorted(snapshots)[1:-8]:  # keep the start and the last eight
                del snapshots[old]
            _save_atomically(snapshots, options.save_params)  # a peer killed later still leaves its file
        return new_epoch

    try:
        while not stop.is_set() and time.monotonic() < deadline:
            seeds = batch_seeds(config.run_id, session.identity.public_key, epoch.number, epoch.next_batch)
            result, next_epoch = do_batch(policy, epoch, collector, seeds, progress, step)
            now = time.monotonic()
            coordinator_epoch, drifted = session.submit(make_receipt(session, result, epoch, now - start))
            used[epoch.number] = epoch.next_batch
            epoch = next_epoch
            epoch.next_batch = max(epoch.next_batch, used.get(epoch.number, 0))  # back in an epoch after a reload
            ok = coordinator_epoch is not None
            ahead = ahead + 1 if ok and opt.local_epoch > coordinator_epoch else 0
            # ahead for AHEAD_REPORTS receipts: it ended epochs without the reducer (a failed round) and its
            # samples no longer count; a shorter lead is only the coordinator's epoch lagging its own step
            if ahead >= AHEAD_REPORTS or drifted:
                logger.warning("epoch %d: this peer's parameters left the swarm's; reloading the swarm's state",
                               opt.local_epoch)
                swarm.resync(opt, coordinator_epoch if ok else min(opt.local_epoch, opt.tracker.global_epoch))
                epoch = Epoch(policy, opt.local_epoch, config, used.get(opt.local_epoch, 0))
                ahead = 0
            if ok != reporting:
                reporting = ok
                logger.log(logging.INFO if ok else logging.WARNING, "coordinator %s; training goes on",
                           "answers again" if ok else "does not take receipts")
            rate = progress.samples / max(now - start, 1e-9)
            line = (f"epoch {opt.local_epoch} | {rate:,.0f} samples/s | {progress.batches:,} batches, "
                    f"{progress.env_steps:,} env steps | mean return {_fmt(progress.mean_return())}")
            if options.live_status:
                sys.stderr.write("\r" + line.ljust(100))
                sys.stderr.flush()
            elif now - shown >= 10.0:
                shown = now
                logger.info(line)
    except Stopped:
        pass
    finally:
        collector.close()
        if options.live_status:
            sys.stderr.write("\n")
        t = progress.timings
        logger.info("%.1f s in all: collecting %.1f s, computing contributions %.1f s, optimizer steps %.1f s (of "
                    "which averaging rounds %.1f s)", time.monotonic() - start, t.collect, t.compute, t.step,
                    t.average)


def _save_atomically(obj: object, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
