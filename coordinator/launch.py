"""hivegym-launch wired together: trusted peer, gRPC server, local peers, evaluation, run directory."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from hivegym.coordinator import local_peers
from hivegym.coordinator.dashboard import Dashboard
from hivegym.coordinator.distiller import Distiller
from hivegym.coordinator.ledger import Ledger
from hivegym.coordinator.server import SwarmState, start_server
from hivegym.coordinator.verifier import Verifier
from hivegym.coordinator.trusted_peer import TrustedPeer, evaluate_snapshot, warm_up
from hivegym.distill.package import summary as checkpoint_summary
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity, encode_key, format_join
from hivegym.protocol.shutdown import kill_descendants, stop_on_signals

logger = logging.getLogger(__name__)
SHUTDOWN_DEADLINE_S = 8.0  # after a stop signal; the local peers alone get 4 s to stop


@dataclass
class LaunchOptions:
    host: str
    """Interface of the gRPC server."""
    port: int
    """Port of the gRPC server (0: any free port)."""
    run_dir: Path
    """Where metrics.jsonl, summary.json and the peers' logs go."""
    local_peers: int
    """Peers to start on this machine as child processes."""
    target_return: float | None
    """Stop with success once the evaluation's mean return reaches this."""
    max_minutes: float | None
    """Stop with failure if the target is not reached by then."""
    host_maddrs: list[str]
    """libp2p addresses the trusted peer listens on."""
    announce_maddrs: list[str]
    """libp2p addresses the trusted peer tells others to dial (a public address)."""
    advertise_host: str
    """Host name or address that peers use to reach the gRPC server (printed in the join command)."""
    identity: Identity
    """The coordinator's Ed25519 key: signs checkpoints; its public half is in the join string."""
    dashboard: bool = True
    """Serve the dashboard (an HTML page and /api/status)."""
    dashboard_host: str = "127.0.0.1"
    """Interface of the dashboard's HTTP server."""
    dashboard_port: int | None = None
    """Port of the dashboard (None: 8080, or any free port if 8080 is taken; 0: any free port)."""


def start_auditor(idle: bool) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=lower_priority,
                               initargs=(idle,))


def lower_priority(idle: bool) -> None:
    import os

    import torch

    if idle and hasattr(os, "SCHED_IDLE"):  # Linux: only CPU time that nothing else wants
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(10)
    torch.set_num_threads(1)


class Launch:
    def __init__(self, config: RunConfig, options: LaunchOptions):
        self.config, self.options = config, options
        self.stop = threading.Event()
        self.reached = False
        self.peers: list[local_peers.LocalPeer] = []
        self.metrics = open(options.run_dir / "metrics.jsonl", "a")
        self.started = time.monotonic()
        self.ended: float | None = None
        self.distiller = Distiller(config, options.run_dir / "checkpoints", options.identity)
        self.ledger = Ledger(options.run_dir / "ledger.sqlite")
        self.verifier: Verifier | None = None

    def run(self) -> dict:
        # hivemind first, gRPC after: gRPC then has no threads when hivemind forks (HIVEMIND_NOTES)
        # evaluation runs in its own process: the trusted peer must keep stepping, or a round goes without it
        evaluator = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        evaluator.submit(warm_up)
        # audits replay batches in their own low-priority process: they must never hold up the trusted peer or gRPC
        self.auditor = start_auditor(self.config.audit_idle)
        trusted = server = state = dashboard = None
        try:
            trusted = TrustedPeer(self.config, self.options.host_maddrs or None, self.options.announce_maddrs or None)
            maddrs = trusted.maddrs()
            self.verifier = Verifier(self.config, self.options.identity, self.ledger, trusted.allow, trusted.ban)
            self.verifier.add_epoch(trusted.epoch, trusted.snapshot(), trusted.state.hash)
            state = SwarmState(self.config.to_json(), maddrs, checkpoints_dir=self.options.run_dir / "checkpoints",
                               ledger=self.ledger, owner_tag=trusted.tag)
            server, port = start_server(state, self.verifier, self.options.host, self.options.port)
            address = f"{self.options.advertise_host}:{port}"
            join = format_join(address, self.options.identity.public_key)
            info = {"grpc": address, "maddrs": maddrs, "public_key": encode_key(self.options.identity.public_key),
                    "join": join}
            if self.options.dashboard:
                dashboard = self.start_dashboard(state)
                info["dashboard"] = dashboard.url
                logger.info("dashboard on %s", info["dashboard"])
            (self.options.run_dir / "coordinator.json").write_text(json.dumps(info))
            logger.info("trusted peer listening on %s", " ".join(maddrs))
            logger.info("gRPC server on %s:%d; join with:\n    hivegym-join --coordinator %s",
                        self.options.host, port, join)
            request_stop = stop_on_signals(self.stop, SHUTDOWN_DEADLINE_S, lambda: self.forced_exit(trusted, state))
            if self.options.max_minutes:  # the loop ends the run at the deadline; this is for a loop stuck in hivemind
                backstop = threading.Timer(self.options.max_minutes * 60 + self.config.averaging_timeout + 30,
                                           request_stop)
                backstop.daemon = True
                backstop.start()
            for i in range(self.options.local_peers):
                self.peers.append(local_peers.LocalPeer(
                    f"local-{i}", format_join(f"127.0.0.1:{port}", self.options.identity.public_key),
                    self.options.run_dir / f"peer-{i}.log",
                    ["--save-params", str(self.options.run_dir / f"peer-{i}.params.pt"),
                     "--identity", str(self.options.run_dir / f"peer-{i}.key")]))
            self.loop(trusted, state, evaluator)
            self.ended = time.monotonic()  # wall_s stops here: shutdown is not part of the run
        finally:
            local_peers.stop_all(self.peers)
            if server is not None:
                server.stop(grace=1).wait(2)
            evaluator.shutdown(wait=False, cancel_futures=True)
            self.auditor.shutdown(wait=False, cancel_futures=True)
            if self.reached:
                self.distiller.finish()
            self.distiller.close()
            if dashboard is not None:  # closed last: it shows the final distillation's packages as they land
                dashboard.close()
            if trusted is not None:
                trusted.shutdown()
            kill_descendants()
            self.metrics.close()
        result = self.summary(trusted, state)
        self.ledger.close()
        return result

    def forced_exit(self, trusted: TrustedPeer, state: SwarmState) -> None:
        """A shutdown past its deadline: the local peers are killed, and summary.json is still written."""
        for peer in self.peers:
            peer.signal(signal.SIGKILL)
        self.ended = self.ended or time.monotonic()
        self.summary(trusted, state)

    def start_dashboard(self, state: SwarmState) -> Dashboard:
        info = {"run_id": self.config.run_id, "env_id": self.config.env_id,
                "target_return": self.options.target_return}
        host = self.options.dashboard_host
        shown = self.options.advertise_host if host in ("0.0.0.0", "::", "") else host  # where a browser goes
        return Dashboard(state, self.options.run_dir, host, self.options.dashboard_port, info, shown)

    def loop(self, trusted: TrustedPeer, state: SwarmState, evaluator: ProcessPoolExecutor) -> None:
        """Train the trusted peer; after every one of its optimizer steps, do the coordinator's bookkeeping
        (a step can wait for a whole averaging round, so a rollout is too coarse a tick)."""
        deadline = self.started + self.options.max_minutes * 60 if self.options.max_minutes else float("inf")
        pending: Future | None = None
        pending_snapshot: dict | None = None
        pending_epoch = logged_epoch = last_eval_epoch = 0
        kept_epoch = trusted.epoch
        allowed_until = 0.0

        def after_step() -> bool:
            """Returns True when the run is over."""
            nonlocal pending, pending_snapshot, pending_epoch, logged_epoch, last_eval_epoch, kept_epoch, allowed_until
            if time.time() > allowed_until - self.config.token_ttl / 2:  # extra reducers admit the trusted peer too
                allowed_until = time.time() + self.config.token_ttl
                trusted.allow(trusted.dht.peer_id.to_base58(), allowed_until)
            if trusted.epoch != kept_epoch:  # parameters of every epoch, for audits and late joiners' checks
                kept_epoch = trusted.epoch
                self.verifier.add_epoch(kept_epoch, trusted.snapshot(), trusted.state.hash)
            for sent in trusted.sent_sketches():  # the round that ended the epoch before this one
                self.verifier.rounds.add_sent(trusted.epoch - 1, sent)
            try:
                self.verifier.pump(self.auditor)
            except BrokenProcessPool:
                if self.stop.is_set():  # the stop signal reached the worker too: a new one would outlive this run
                    return True
                logger.error("the audit worker died; starting another")
                self.auditor.shutdown(wait=False, cancel_futures=True)
                self.auditor = start_auditor(self.config.audit_idle)
            if self.stop.is_set():
                return True
            if time.monotonic() > deadline:
                logger.warning("no target reached within --max-minutes %s", self.options.max_minutes)
                return True
            epoch = trusted.epoch
            with state.lock:
                state.epoch = epoch
            if pending is not None and pending.done():
                returns = pending.result()
                with state.lock:
                    state.last_eval_return = sum(returns) / len(returns)
                    state.last_eval_epoch = pending_epoch
                logger.info("evaluation at epoch %d: mean return %.1f over %d episodes", pending_epoch,
                            state.last_eval_return, len(returns))
                pending = None
                self.distiller.on_evaluation(pending_epoch, state.last_eval_return, pending_snapshot)
                if self.options.target_return is not None and state.last_eval_return >= self.options.target_return:
                    self.reached = True
                    return True
            if pending is None and epoch >= last_eval_epoch + self.config.eval_every:
                pending_snapshot = trusted.snapshot()
                pending, pending_epoch, last_eval_epoch = (
                    evaluator.submit(evaluate_snapshot, self.config.to_json(), pending_snapshot), epoch, epoch)
            self.distiller.poll(epoch, trusted.snapshot)
            if epoch > logged_epoch:
                logged_epoch = epoch
                self.log_epoch(state)
            return False

        while not trusted.train_once(after_step):
            pass

    def log_epoch(self, state: SwarmState) -> None:
        now = time.monotonic()
        with state.lock:
            row = {"time": time.time(), "wall_s": round(now - self.started, 3), "epoch": state.epoch,
                   "env_steps": state.env_steps(), "samples_per_second": round(state.samples_per_second(now), 1),
                   "peers": len(state.live_peers(now)), "eval_return": state.last_eval_return,
                   "eval_epoch": state.last_eval_epoch}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        logger.info("epoch %d | %s env steps | %.0f samples/s | %d peers | eval %s", row["epoch"],
                    f"{row['env_steps']:,}", row["samples_per_second"], row["peers"],
                    "-" if row["eval_return"] is None else f"{row['eval_return']:.1f}")

    def summary(self, trusted: TrustedPeer | None, state: SwarmState | None) -> dict:
        result = {"reached": self.reached, "wall_s": round((self.ended or time.monotonic()) - self.started, 2),
                  "env_steps": state.env_steps() if state else 0,
                  "eval_return": state.last_eval_return if state else None,
                  "epoch": trusted.epoch if trusted else 0,
                  "checkpoints": checkpoint_summary(self.options.run_dir / "checkpoints")}
        first = None if state is None or state.first_report is None else round(state.first_report - self.started, 2)
        peers = {} if state is None else {p.name: {"peer_id": pid, "env_steps": p.env_steps, "samples": p.samples,
                                                   **p.timings} for pid, p in state.peers.items()}
        details = {**result, "first_report_s": first, "run_dir": str(self.options.run_dir),
                   "config": json.loads(self.config.to_json()), "peers": peers, "ledger": self.ledger.leaderboard(),
                   "refusals": self.verifier.refusals if self.verifier else {}}
        (self.options.run_dir / "summary.json").write_text(json.dumps(details, indent=2))
        return result
