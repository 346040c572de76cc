"""Which receipts the coordinator samples, in what order it audits them and what a diverged replay counts as, over
real gRPC and the SQLite ledger: when audits fall behind, a busy peer's backlog must not starve the others, a peer
none of whose sampled receipts has been replayed yet stays 'new', and a grad-mode peer that drifted is no cheat."""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from hivegym.coordinator import verifier as verifier_module
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient
from procs import wait_for
from servers import SMALL, TestServer


@pytest.fixture
def server(tmp_path):
    server = TestServer(tmp_path, dataclasses.replace(SMALL, audit_rate=0.0, audit_rate_new=1.0, new_peer_receipts=2))
    yield server
    server.close()


def hand_in(server: TestServer, name: str, batches: int) -> Identity:
    identity = Identity.generate()
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    client.join(name, "cpu", server.credentials(identity, name))
    receipt = server.receipt(identity)
    for batch in range(batches):
        client.submit_receipt(*dataclasses.replace(receipt, batch=batch).sign(identity))
    client.close()
    return identity


def test_a_peer_stays_new_until_it_passes_an_audit(server):
    busy = hand_in(server, "busy", 5)  # past new_peer_receipts, but nothing replayed yet
    assert len(server.verifier.queues[busy.peer_id]) == 5


def test_every_peer_gets_its_turn_and_newest_receipts_go_first(server):
    busy, quiet = hand_in(server, "busy", 5), hand_in(server, "quiet", 1)
    order = [(job.peer_id, job.receipt.batch) for job in iter(server.verifier._next_job, None)]
    assert order == [(busy.peer_id, 4), (quiet.peer_id, 0), (busy.peer_id, 3), (busy.peer_id, 2),
                     (busy.peer_id, 1), (busy.peer_id, 0)]


def test_a_full_queue_drops_the_oldest_as_skipped(server, monkeypatch):
    monkeypatch.setattr(verifier_module, "MAX_QUEUED_AUDITS_PER_PEER", 3)
    busy = hand_in(server, "busy", 5)
    assert [job.receipt.batch for job in server.verifier.queues[busy.peer_id]] == [2, 3, 4]
    verdicts = server.ledger.db.execute("SELECT batch, audit FROM receipts ORDER BY batch").fetchall()
    assert verdicts == [(0, "skipped"), (1, "skipped"), (2, "pending"), (3, "pending"), (4, "pending")]


def test_diverged_actions_are_a_strike(tmp_path):
    """Actions that differ from the replay in every stream, replayed by the real audit worker, from a receipt whose
    parameters are near the epoch's but not exactly them: every round leaves a peer the group's average up to the
    codec's rounding, so this is a failed audit, not a drift to forgive."""
    server = TestServer(tmp_path, dataclasses.replace(SMALL, audit_rate_new=1.0))
    identity = Identity.generate()
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    client.join("drifted", "cpu", server.credentials(identity, "drifted"))
    honest, other = server.receipt(identity), server.receipt(identity, batch=1)  # other seeds, other actions
    receipt = dataclasses.replace(honest, actions=other.actions, params_hash="f" * len(honest.params_hash))
    client.submit_receipt(*receipt.sign(identity))
    client.close()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        wait_for(lambda: server.verifier.pump(pool) or server.verifier.idle(), 60, "the audit")
    audit, detail = server.ledger.db.execute("SELECT audit, audit_detail FROM receipts").fetchone()
    server.close()
    assert audit == "failed" and "actions differ" in detail, detail
