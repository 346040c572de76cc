"""The coordinator's own hivemind peer: a full (non-client) peer that reduces every round and serves state.

It contributes nothing to training: each of its optimizer steps counts one sample and leaves the parameters as they
are. A peer with no samples publishes no progress, so client volunteers would never learn the swarm's epoch, and
step(batch_size=0) divides by zero in hivemind; one sample per step is enough for both, and in a round it weighs
those few samples against the volunteers' thousands.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
from typing import Callable

import torch
from hivemind.optim.state_averager import TrainingStateAverager

from hivegym.coordinator import reducer
from hivegym.peer import swarm
from hivegym.peer.worker import Epoch
from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import build_policy, parameter_count
from hivegym.protocol.rollout import evaluate
from hivegym.protocol.work import sketch_seed

logger = logging.getLogger(__name__)

TRUSTED_SAMPLES = 1  # samples each of its steps counts
TRUSTED_PAUSE_S = 0.1  # pause after each step; keeps it to a small share of one core
BAN_RECORD_S = 7 * 24 * 3600.0


class TrustedPeer:
    """A full hivemind peer whose averagers reduce robustly and serve only peers with access (reducer.py)."""

    def __init__(self, config: RunConfig, host_maddrs: list[str] | None = None,
                 announce_maddrs: list[str] | None = None, initial_peers: list[str] = (),
                 coordinator_tag: bytes | None = None):
        """The coordinator's own trusted peer; with initial_peers and the coordinator's record tag, an extra trusted
        reducer on another host (coordinator/remote_reducer.py)."""
        self.config = config
        self.tag = coordinator_tag or reducer.owner_tag()  # whose access and ban records its averagers obey
        self.policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
        # what each volunteer sends into a round comes back here as a sketch (parameter averaging only)
        self.sent = multiprocessing.get_context("fork").Queue()
        spec = (config.sketch_dim, sketch_seed(config.run_id), parameter_count(self.policy))
        # before the averagers fork
        reducer.install(config.run_id, self.tag, spec, self.sent, max_weight=config.target_batch_size)
        serve_epoch_states()
        self.dht = swarm.start_dht(list(initial_peers), client_mode=False, host_maddrs=host_maddrs,
                                   announce_maddrs=announce_maddrs,
                                   record_validators=reducer.validators(config.run_id, self.tag))
        self.opt = swarm.make_optimizer(self.dht, self.policy, config, client_mode=False)
        self.state = Epoch(self.policy, self.opt.local_epoch, config)
        serve_epoch_state(self.opt, self.state)

    def catch_up(self) -> None:
        """Start from the swarm's state (an extra reducer joining a running swarm)."""
        if not swarm.wait_for_reducer(self.opt, timeout=self.config.load_state_timeout):
            raise RuntimeError("no trusted peer of the swarm answered within load_state_timeout")
        if self.opt.tracker.global_epoch > 0:
            self.opt.load_state_from_peers()
        self.state = Epoch(self.policy, self.opt.local_epoch, self.config)
        serve_epoch_state(self.opt, self.state)

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    def maddrs(self) -> list[str]:
        return swarm.visible_maddrs(self.dht)

    def train_once(self, after_step: Callable[[], bool]) -> bool:
        """One optimizer step of TRUSTED_SAMPLES samples that leaves the parameters as they are (it may join an
        averaging round), then after_step(); returns what after_step returns (True: the run is over)."""
        new_epoch = swarm.step(self.opt, TRUSTED_SAMPLES)
        if new_epoch is not None:
            self.state = Epoch(self.policy, new_epoch, self.config)
            serve_epoch_state(self.opt, self.state)
        done = after_step()
        time.sleep(TRUSTED_PAUSE_S)
        return done

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The current epoch's parameters (what peers hold right after the round that began it)."""
        return {k: v.detach().clone() for k, v in self.state.behaviour.state_dict().items()}

    def sent_sketches(self) -> list[dict[str, list[float]]]:
        """What the rounds since the last call received from each sender, as {hivemind id: sketch}."""
        items = []
        while True:
            try:
                items.append(self.sent.get_nowait())
            except queue.Empty:
                return items

    def allow(self, libp2p_id: str, expires: float) -> None:
        """Store the access record of a peer in the DHT (signed with this process's key)."""
        self.dht.store(f"{self.config.run_id}_access", subkey=reducer.subkey(libp2p_id, self.tag), value=expires,
                       expiration_time=expires, return_future=True)

    def ban(self, libp2p_id: str) -> None:
        self.dht.store(f"{self.config.run_id}_bans", subkey=reducer.subkey(libp2p_id, self.tag), value=True,
                       expiration_time=time.time() + BAN_RECORD_S, return_future=True)

    def shutdown(self) -> None:
        self.sent.cancel_join_thread()
        swarm.shutdown(self.opt, self.dht)


def serve_epoch_states() -> None:
    """Make state averagers created after this serve what serve_epoch_state set (hivemind binds the method when
    an averager is created). The live tensors hold this peer's own contribution while it steps (seconds, when
    the step waits for a round), and hivemind reads the epoch label apart from the tensors: a late joiner could
    otherwise get a state that matches no hash the coordinator signed."""
    if hasattr(TrainingStateAverager, "_hivegym_live_state"):
        return
    TrainingStateAverager._hivegym_live_state = TrainingStateAverager.get_current_state

    def get_current_state(self):
        metadata, tensors, infos = self._hivegym_live_state()
        served = getattr(self, "hivegym_served", None)
        if served is not None:
            metadata["epoch"], params = served
            tensors = list(params) + list(tensors[len(params):])
        return metadata, tensors, infos

    TrainingStateAverager.get_current_state = get_current_state


def serve_epoch_state(opt, epoch: Epoch) -> None:
    """From now on, downloaders get the parameters this epoch began with, labelled with its number."""
    params = tuple(p.detach().cpu().clone() for p in epoch.behaviour.parameters())
    opt.state_averager.hivegym_served = (epoch.number, params)


def warm_up() -> None:
    """Runs first in the evaluation worker, so its imports are paid before the first evaluation is due."""
    torch.set_num_threads(1)
    import gymnasium  # noqa: F401


def evaluate_snapshot(config_json: str, state: dict[str, torch.Tensor]) -> list[float]:
    """Runs in the evaluation worker process: deterministic returns of a parameter snapshot."""
    torch.set_num_threads(1)
    config = RunConfig.from_json(config_json)
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    policy.load_state_dict(state)
    return evaluate(policy, config.env_id, config.eval_episodes, config.eval_seed)
