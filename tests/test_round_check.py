"""The coordinator's round check: the sketch of what a peer sent into a round (as the trusted reducer reports it)
against the receipts it handed in over real gRPC. Honest peers that reloaded the swarm's state, or fell off its
parameters, are not struck; a peer that sends something other than its receipts say is."""

from __future__ import annotations

import dataclasses
import math
import random

import grpc
import pytest
import torch

from hivegym.coordinator import round_check
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient
from servers import SMALL, TestServer

LIBP2P_ID = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"  # any base58 hivemind peer id


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(round_check, "SENT_CHECK_DELAY_S", 0.0)  # check a round as soon as it is reported
    server = TestServer(tmp_path, dataclasses.replace(SMALL, audit_rate=0.0, audit_rate_new=0.0))
    initial = server.policy.state_dict()
    for epoch in (1, 2, 3):  # epochs whose parameters differ from epoch 0's
        generator = torch.Generator().manual_seed(epoch)
        state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in initial.items()}
        server.verifier.add_epoch(epoch, state, f"{epoch:064x}")
    yield server
    server.close()


@pytest.fixture
def peer(server):
    """(identity, client) of a peer that joined and bound its token to LIBP2P_ID."""
    identity = Identity.generate()
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    client.join("peer-1", "cpu", server.credentials(identity, "peer-1"))
    client.renew_token("peer-1", server.credentials(identity, "peer-1", LIBP2P_ID))
    yield identity, client
    client.close()


def updates(server: TestServer, count: int, seed: int) -> list[list[float]]:
    """Contribution sketches a tenth the size of the parameters' sketch (far above the codec's allowance)."""
    rng = random.Random(seed)
    scale = 0.1 * math.hypot(*server.verifier.sketches[0]) / math.sqrt(SMALL.sketch_dim)
    return [[rng.gauss(0.0, scale) for _ in range(SMALL.sketch_dim)] for _ in range(count)]


def hand_in(server: TestServer, peer, label: int, params_epoch: int, first_batch: int,
            contributions: list[list[float]]) -> None:
    identity, client = peer
    for i, update in enumerate(contributions):
        receipt = server.receipt(identity, epoch=label, batch=first_batch + i, update_sketch=update,
                                 params_sketch=server.verifier.sketches[params_epoch])
        client.submit_receipt(*receipt.sign(identity))


def sent(params: list[float], contributions: list[list[float]], factor: float = 1.0) -> list[float]:
    """What a peer puts into a round: its parameters + factor x the mean of its contributions."""
    mean = [sum(values) / len(contributions) for values in zip(*contributions)]
    return [p + factor * m for p, m in zip(params, mean)]


def strikes_after_round(server: TestServer, epoch: int, sent_sketch: list[float]) -> int:
    peer_id = server.ledger.peer_by_libp2p_id(LIBP2P_ID)
    server.verifier.rounds.add_sent(epoch, {LIBP2P_ID: sent_sketch})
    server.verifier.rounds.check()
    return server.ledger.peer(peer_id)["strikes"]


@pytest.mark.parametrize("factor, strikes", [(1.0, 0), (-10.0, 1), (0.0, 1)])
def test_what_was_sent_must_be_the_receipts_mean(server, peer, factor, strikes):
    contributions = updates(server, 3, seed=0)
    hand_in(server, peer, label=1, params_epoch=1, first_batch=0, contributions=contributions)
    assert strikes_after_round(server, 1, sent(server.verifier.sketches[1], contributions, factor)) == strikes


def test_a_peer_that_reloaded_the_state_mid_epoch_is_not_struck(server, peer):
    """Two batches with epoch 0's parameters under label 1, then a reload to epoch 1's: it sends epoch 1's
    parameters + the mean of the two batches after the reload."""
    before, after = updates(server, 2, seed=1), updates(server, 2, seed=2)
    hand_in(server, peer, label=1, params_epoch=0, first_batch=0, contributions=before)
    hand_in(server, peer, label=1, params_epoch=1, first_batch=2, contributions=after)
    assert strikes_after_round(server, 1, sent(server.verifier.sketches[1], after)) == 0
    assert strikes_after_round(server, 1, sent(server.verifier.sketches[0], after)) == 1  # the wrong parameters


def test_a_mean_started_afresh_is_not_struck(server, peer):
    """A reload that failed (hivemind refused the donor) leaves the parameters and starts the mean again."""
    contributions = updates(server, 4, seed=3)
    hand_in(server, peer, label=1, params_epoch=1, first_batch=0, contributions=contributions)
    assert strikes_after_round(server, 1, sent(server.verifier.sketches[1], contributions[2:])) == 0


def test_a_peer_off_the_swarms_parameters_is_not_checked_in_those_rounds(server, peer):
    """Two batches in sync, then its parameters leave the swarm's (a failed round): that batch is refused."""
    identity, client = peer
    hand_in(server, peer, label=0, params_epoch=0, first_batch=0, contributions=updates(server, 2, seed=6))
    off = [x + 1.0 for x in server.verifier.sketches[0]]
    receipt = server.receipt(identity, epoch=0, batch=2, update_sketch=updates(server, 1, seed=4)[0],
                             params_sketch=off)
    with pytest.raises(grpc.RpcError) as refused:
        client.submit_receipt(*receipt.sign(identity))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # it sends from parameters the ledger has no receipt of: nothing to compare with, no strike
    assert strikes_after_round(server, 0, sent(off, updates(server, 1, seed=4))) == 0
    assert strikes_after_round(server, 1, [0.0] * SMALL.sketch_dim) == 0  # epoch 1's round is next to it
    # two epochs on, its receipts are in sync again and the check applies
    contributions = updates(server, 2, seed=5)
    hand_in(server, peer, label=3, params_epoch=3, first_batch=0, contributions=contributions)
    assert strikes_after_round(server, 3, sent(server.verifier.sketches[3], contributions, -10.0)) == 1
