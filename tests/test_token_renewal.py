"""A volunteer's token stays valid through a slow start: the session renews it in the background (a real gRPC
coordinator server and ledger on 127.0.0.1, the real volunteer Session and client)."""

from __future__ import annotations

import dataclasses
import time

from hivegym.peer.volunteer import Session, TokenRenewer
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient
from servers import SMALL, TestServer

LIBP2P_ID = "12D3KooWGyU75bZS5iyzoCra23zBKMe3dbToFU2xLQSixMpr9vaM"
TTL_S = 1.0


def joined_session(server: TestServer) -> Session:
    identity = Identity.generate()
    session = Session(CoordinatorClient(server.address, timeout=5, retries=2), identity, "slow-peer",
                      server.identity.public_key)
    session.join("cpu")
    session.libp2p_id = LIBP2P_ID
    session.renew()  # bound to its hivemind id, as after the DHT starts
    return session


def test_the_background_renewal_outlives_the_token_ttl(tmp_path):
    server = TestServer(tmp_path, dataclasses.replace(SMALL, token_ttl=TTL_S))
    session = joined_session(server)
    receipt = server.receipt(session.identity)
    first_expiry = session.token_expires
    renewer = TokenRenewer(session)
    try:
        time.sleep(3 * TTL_S)  # a slow optimizer start and state download
        assert session.token_expires > first_expiry + TTL_S
        epoch, drifted = session.submit(receipt)  # refused as UNAUTHENTICATED if the token had lapsed
        assert epoch == 0 and not drifted
        assert server.ledger.receipt_counts(session.identity.peer_id)[0] == 1
        kind, (libp2p_id, expires) = server.published[-1]  # what the trusted averagers admit it by
        assert (kind, libp2p_id) == ("access", LIBP2P_ID) and expires > time.time()
    finally:
        renewer.stop()
        session.client.close()
        server.close()


def test_without_renewal_the_same_wait_loses_the_token(tmp_path):
    server = TestServer(tmp_path, dataclasses.replace(SMALL, token_ttl=TTL_S))
    session = joined_session(server)
    receipt = server.receipt(session.identity)
    try:
        time.sleep(1.5 * TTL_S)
        epoch, _ = session.submit(receipt)
        assert epoch is None
        assert server.verifier.refusals[session.identity.peer_id] == {"UNAUTHENTICATED": 1}
    finally:
        session.client.close()
        server.close()
