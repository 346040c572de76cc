"""An extra trusted reducer on another host: run by the coordinator's operator (it proves the coordinator's own
key), it takes part in every averaging round like the coordinator's trusted peer, reduces its share of the parts
robustly, and admits only peers with the coordinator's access records. It spreads the reducers' bandwidth, which
otherwise grows with the number of volunteers at the coordinator alone.

    hivegym-launch --reducer-for HOST:PORT#KEY --identity COORDINATOR_KEY_FILE --host-maddrs ... --announce-maddrs ...
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from hivegym.coordinator.trusted_peer import TrustedPeer
from hivegym.coordinator.verifier import REDUCER_NAME
from hivegym.peer.volunteer import Session
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient, describe_error
from hivegym.protocol.shutdown import stop_on_signals

logger = logging.getLogger(__name__)
SHUTDOWN_DEADLINE_S = 6.0


def run_reducer(address: str, identity: Identity, host_maddrs: list[str], announce_maddrs: list[str],
                max_minutes: float | None) -> int:
    client = CoordinatorClient(address, RunConfig.rpc_timeout, RunConfig.rpc_retries)
    session = Session(client, identity, REDUCER_NAME, identity.public_key)
    reply = client.register_reducer(session.credentials(), [])
    config = RunConfig.from_json(reply.run_config_json)
    peer = TrustedPeer(config, host_maddrs or None, announce_maddrs or None, list(reply.bootstrap_maddrs),
                       reply.owner_tag)
    try:
        session.libp2p_id = peer.dht.peer_id.to_base58()

        def register() -> None:  # access for its hivemind id, renewed at half the token's lifetime
            client.register_reducer(session.credentials(), peer.maddrs())

        register()
        peer.catch_up()
        logger.info("trusted reducer %s running at epoch %d: %s", session.libp2p_id, peer.epoch,
                    " ".join(peer.maddrs()))
        stop = threading.Event()
        stop_on_signals(stop, SHUTDOWN_DEADLINE_S)
        deadline = time.monotonic() + max_minutes * 60 if max_minutes else float("inf")
        registered, logged = time.monotonic(), peer.epoch

        def after_step() -> bool:
            nonlocal registered, logged
            if peer.epoch != logged:
                logged = peer.epoch
                logger.info("epoch %d", logged)
            if time.monotonic() - registered > config.token_ttl / 2:
                try:
                    register()
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    logger.warning("the coordinator does not answer (%s); stopping", describe_error(e))
                    return True
                registered = time.monotonic()
            return stop.is_set() or time.monotonic() > deadline

        while not peer.train_once(after_step):
            pass
        return 0
    finally:
        peer.shutdown()
        client.close()
