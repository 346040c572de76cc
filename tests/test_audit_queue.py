"""Which receipts the coordinator samples and in what order it audits them, over real gRPC and the SQLite ledger:
when audits fall behind, a busy peer's backlog must not starve the others, and a peer none of whose sampled
receipts has been replayed yet stays 'new'."""

from __future__ import annotations

import dataclasses

import pytest

from hivegym.coordinator import verifier as verifier_module
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient
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
