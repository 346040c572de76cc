"""A volunteer's session: join the coordinator, enter the swarm, train until stopped."""

from __future__ import annotations

import copy
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from hivegym.peer import swarm
from hivegym.peer.preflight import preflight
from hivegym.peer.worker import Progress, train_rollout
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import ConfigError, RunConfig
from hivegym.protocol.policy import build_policy
from hivegym.protocol.rollout import Collector, derive_seed
from hivegym.protocol.rpc import CoordinatorClient, describe_error
from hivegym.protocol.shutdown import stop_on_signals

logger = logging.getLogger(__name__)
AHEAD_REPORTS = 5
SHUTDOWN_DEADLINE_S = 6.0  # after a stop signal: the coordinator kills its local peers' groups at 8 s


class JoinFailed(RuntimeError):
    """The peer cannot start; the message is one line that says what to do."""


class Stopped(Exception):
    """Raised inside the loop once a stop was asked for, so a long PPO pass ends at the next step."""


@dataclass
class VolunteerOptions:
    coordinator: str
    """HOST:PORT of the coordinator's gRPC server."""
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
    # the run's own timeouts arrive with Join; until then the config's defaults apply
    client = CoordinatorClient(options.coordinator, RunConfig.rpc_timeout, RunConfig.rpc_retries)
    p2p = dict(host_maddrs=list(options.host_maddrs) or None, announce_maddrs=list(options.announce_maddrs) or None,
               use_relay=options.use_relay, use_auto_relay=options.auto_relay)
    reply, failures = preflight(client, options.name, device.type, p2p)
    if failures:
        client.close()
        raise JoinFailed("\n".join(failures))  # one line per failed check
    try:
        config = RunConfig.from_json(reply.run_config_json)
    except (ConfigError, TypeError) as e:
        raise JoinFailed(f"the coordinator sent a run config this hivegym cannot use ({e}); upgrade hivegym")
    client.timeout, client.retries = config.rpc_timeout, config.rpc_retries

    dht = opt = None
    try:
        try:
            dht = swarm.start_dht(list(reply.bootstrap_maddrs), client_mode=options.client_mode, **p2p)
        except Exception as e:
            raise JoinFailed(f"cannot reach the swarm's bootstrap peers {list(reply.bootstrap_maddrs)} ({e}); "
                             "check that their ports are reachable from here") from None
        policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed).to(device)
        opt = swarm.make_optimizer(dht, policy, config, client_mode=options.client_mode)
        if not swarm.wait_for_reducer(opt, timeout=config.load_state_timeout):
            raise JoinFailed("no trusted peer of the swarm answered within load_state_timeout; is the coordinator "
                             "still running?")
        if opt.tracker.global_epoch > 0:  # late joiner: start from the swarm's parameters, not from scratch
            opt.load_state_from_peers()
            logger.info("loaded the swarm's state at epoch %d", opt.local_epoch)
        # handlers go in after hivemind's processes have forked, so SIGTERM still ends those at once
        stop = threading.Event()
        stop_on_signals(stop, SHUTDOWN_DEADLINE_S)
        train(options, config, client, opt, policy, device, stop)
        return 0
    finally:
        swarm.shutdown(opt, dht)
        client.close()


def train(options: VolunteerOptions, config: RunConfig, client: CoordinatorClient, opt, policy, device, stop
          ) -> None:
    actor = copy.deepcopy(policy).cpu() if device.type != "cpu" else None
    collector = Collector(config.env_id, config.num_envs, derive_seed(config.run_id, options.name, "envs"))
    progress, start = Progress(), time.monotonic()
    deadline = start + options.max_minutes * 60 if options.max_minutes else float("inf")
    # {epoch: parameters right after the step that reached it}; the first entry is the starting state
    snapshots = {opt.local_epoch: _cpu_copy(policy)}
    if options.save_params:
        _save_atomically(snapshots, options.save_params)
    shown = reported = 0.0
    reporting = True  # False while the coordinator does not answer; logged once per outage
    ahead = 0  # consecutive reports in which this peer's epoch was past the coordinator's

    def step(batch_size: int) -> None:
        if stop.is_set():
            raise Stopped
        epoch, t0 = opt.local_epoch, time.perf_counter()
        opt.step(batch_size=batch_size)
        if progress.timings.step == 0.0:  # the first gradient this peer contributed
            logger.info("contributed a first gradient")
        if opt.local_epoch == epoch:
            return
        progress.timings.average += time.perf_counter() - t0  # this step ended an epoch: an averaging round
        if options.save_params:  # right after a global step
            snapshots[opt.local_epoch] = _cpu_copy(policy)
            for old in sorted(snapshots)[1:-3]:  # keep the start and the last three
                del snapshots[old]
            _save_atomically(snapshots, options.save_params)  # a peer killed later still leaves its file

    try:
        while not stop.is_set() and time.monotonic() < deadline:
            train_rollout(policy, config, collector, step, progress, (config.run_id, options.name),
                          minibatch_for(device, config), actor)
            now = time.monotonic()
            rate = progress.samples / max(now - start, 1e-9)
            if now - reported >= 1.0:
                reported = now
                coordinator_epoch = report(client, options.name, opt.local_epoch, progress, rate, now - start)
                ok = coordinator_epoch is not None
                ahead = ahead + 1 if ok and opt.local_epoch > coordinator_epoch else 0
                # ahead for AHEAD_REPORTS reports (seconds): it ended epochs without the reducer (a failed round) and
                # its samples no longer count; a shorter lead is only the coordinator's epoch lagging its own step
                if ahead >= AHEAD_REPORTS:
                    logger.warning("epoch %d is past the coordinator's %d; reloading the swarm's state",
                                   opt.local_epoch, coordinator_epoch)
                    swarm.resync(opt, coordinator_epoch)
                    ahead = 0
                if ok != reporting:
                    reporting = ok
                    logger.log(logging.INFO if ok else logging.WARNING, "coordinator %s; training goes on",
                               "answers again" if ok else "does not answer reports")
            line = (f"epoch {opt.local_epoch} | {rate:,.0f} samples/s | contributed {progress.samples:,} samples, "
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
        logger.info("%.1f s in all: collecting %.1f s, computing gradients %.1f s, optimizer steps %.1f s (of "
                    "which averaging rounds %.1f s)", time.monotonic() - start, t.collect, t.compute, t.step, t.average)


def report(client: CoordinatorClient, name: str, epoch: int, progress: Progress, rate: float, wall_s: float
           ) -> int | None:
    """Send cumulative progress; returns the coordinator's epoch, or None if it did not answer (it may be
    restarting; training goes on)."""
    mean = progress.mean_return()
    try:
        reply = client.report(pb.ReportRequest(peer_name=name, epoch=epoch, env_steps=progress.env_steps,
                                               samples=progress.samples, mean_return=mean or 0.0,
                                               samples_per_second=rate, wall_s=wall_s,
                                               **progress.timings.as_dict()))
        return reply.epoch
    except grpc.RpcError as e:
        logger.debug("report failed: %s", describe_error(e))
        return None


def _save_atomically(obj: object, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
