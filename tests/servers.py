"""A real coordinator gRPC server for tests (no hivemind): verifier, SQLite ledger, and honest peers' requests."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from hivegym.coordinator.ledger import Ledger
from hivegym.coordinator.server import SwarmState, start_server
from hivegym.coordinator.verifier import Verifier
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity
from hivegym.protocol.policy import build_policy
from hivegym.protocol.receipt import Receipt, join_message
from hivegym.protocol.rollout import Collector
from hivegym.protocol.work import batch_seeds, replay_batch, flat_params, params_hash, sketch, sketch_seed

SMALL = RunConfig(num_envs=2, rollout_steps=16, update_epochs=2, minibatch_size=16)  # receipts in milliseconds


class TestServer:
    """A started server with its verifier; epoch 0 holds the run's initial parameters. Close with close()."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, tmp_path: Path, config: RunConfig = SMALL, maddrs: list[str] = (),
                 checkpoints_dir: Path | None = None):
        self.config, self.identity = config, Identity.generate()
        self.ledger = Ledger(tmp_path / "ledger.sqlite")
        self.published: list[tuple[str, object]] = []  # ("access", (libp2p_id, expires)) and ("ban", libp2p_id)
        self.verifier = Verifier(config, self.identity, self.ledger,
                                 lambda pid, expires: self.published.append(("access", (pid, expires))),
                                 lambda pid: self.published.append(("ban", pid)))
        self.policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
        self.verifier.add_epoch(0, {k: v.clone() for k, v in self.policy.state_dict().items()},
                                params_hash(self.policy))
        self.state = SwarmState(config.to_json(), list(maddrs), checkpoints_dir=checkpoints_dir, ledger=self.ledger)
        self.server, self.port = start_server(self.state, self.verifier, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.port}"

    def credentials(self, identity: Identity, name: str, libp2p_id: str = "", timestamp: float | None = None
                    ) -> pb.Credentials:
        timestamp = time.time() if timestamp is None else timestamp
        signature = identity.sign(join_message(self.identity.public_key, name, libp2p_id, timestamp))
        return pb.Credentials(public_key=identity.public_key, libp2p_id=libp2p_id, timestamp=timestamp,
                              signature=signature)

    def receipt(self, identity: Identity, epoch: int = 0, batch: int = 0, **changes) -> Receipt:
        """An honest receipt of a real batch collected with the epoch-0 parameters (fields may be replaced)."""
        seeds = batch_seeds(self.config.run_id, identity.public_key, epoch, batch)
        collector = Collector(self.config.env_id, self.config.num_envs, seeds.envs)
        work = replay_batch(self.policy, self.config, collector, seeds)
        collector.close()
        dim, seed = self.config.sketch_dim, sketch_seed(self.config.run_id)
        receipt = Receipt(run_id=self.config.run_id, peer_id=identity.peer_id, epoch=epoch, batch=batch,
                          env_steps=len(work.batch), returns=work.rollout.env_returns,
                          actions=work.rollout.action_digests(), params_hash=params_hash(self.policy),
                          params_sketch=sketch(flat_params(self.policy), dim, seed),
                          update_sketch=sketch(work.update, dim, seed), collect_s=0.01, compute_s=0.01, step_s=0.0,
                          average_s=0.0, wall_s=1.0)
        return dataclasses.replace(receipt, **changes)

    def close(self) -> None:
        self.server.stop(0).wait(2)
        self.ledger.close()
