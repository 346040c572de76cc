"""A trusted reducer's parts: CenteredClip, the coordinator's DHT records that nobody else can write, and the
access guard on a real averager (a peer without an access record gets no state; with one, it does)."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

from hivegym.coordinator import reducer
from hivegym.peer import swarm


def test_centered_clip_bounds_one_outlier():
    honest = [torch.full((16,), 1.0 + 0.1 * i) for i in range(-2, 3)]  # mean 1.0, spread 0.2
    result = reducer.centered_clip(honest + [torch.full((16,), -100.0)])
    assert (result - 1.0).abs().max() < 0.2  # the mean with the outlier would be about -15.8
    assert torch.allclose(reducer.centered_clip(honest), torch.stack(honest).mean(0), atol=1e-6)
    pair = [torch.zeros(4), torch.ones(4)]
    assert torch.equal(reducer.centered_clip(pair), torch.full((4,), 0.5))  # two inputs: no majority, the mean


def test_centered_clip_weighs_inputs_by_samples():
    parts = [torch.zeros(4), torch.full((4,), 0.1), torch.full((4,), 0.2)]  # all within the clipping radius
    # by hand: (3 * 0 + 1 * 0.1 + 0 * 0.2) / 4 = 0.025
    assert torch.allclose(reducer.centered_clip(parts, [3.0, 1.0, 0.0]), torch.full((4,), 0.025), atol=1e-7)
    # two inputs: the weighted mean, (1 * 0 + 3 * 1) / 4
    assert torch.allclose(reducer.centered_clip([torch.zeros(2), torch.ones(2)], [1.0, 3.0]), torch.full((2,), 0.75))
    # a heavy outlier moves the result by at most its weight share times the radius per iteration
    honest = [torch.full((16,), 1.0 + 0.1 * i) for i in range(-2, 3)]
    result = reducer.centered_clip(honest + [torch.full((16,), -100.0)], [1.0] * 5 + [5.0])
    assert (result - 1.0).abs().max() < 3 * 0.5 * 0.2 + 1e-6


def test_round_weights_are_capped_and_never_all_zero():
    assert reducer.round_weights([5120.0, 1.0, 1e12], cap=10240.0) == [5120.0, 1.0, 10240.0]
    assert reducer.round_weights([float("nan"), -3.0, 7.0], cap=10.0) == [0.0, 0.0, 7.0]
    assert reducer.round_weights([0.0, 0.0], cap=10.0) == [1.0, 1.0]  # an all-zero round: equal weights
    assert reducer.round_weights([float("inf"), 0.0], cap=10.0) == [1.0, 1.0]  # a non-finite report counts 0


def test_only_the_coordinator_writes_its_records():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    tag = reducer.owner_tag()
    coordinator = swarm.start_dht([], client_mode=False, record_validators=reducer.validators("run", tag))
    other = RSASignatureValidator(RSAPrivateKey())
    attacker = swarm.start_dht(swarm.visible_maddrs(coordinator), client_mode=False, record_validators=[other])
    try:
        peer, expires = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo", time.time() + 60
        assert coordinator.store("run_access", subkey=reducer.subkey(peer, tag), value=expires, expiration_time=expires)
        forged = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xa"
        attacker.store("run_access", subkey=forged.encode() + other.local_public_key, value=expires,
                       expiration_time=expires)  # signed, but with its own tag
        attacker.store("run_access", value=1.0, expiration_time=time.time() + 600)  # wiping the dictionary
        attacker.store("run_bans", subkey=reducer.subkey(peer, tag), value=True,
                       expiration_time=expires)  # the coordinator's tag without its key
        attacker.store("run_bans", subkey=forged.encode() + other.local_public_key, value="yes",
                       expiration_time=expires)  # another tag and the wrong value type
        # what a trusted averager reads: the coordinator's record, untouched, and no ban at all
        access = coordinator.get("run_access", latest=True)
        mine = reducer.subkey(peer, tag)
        assert list(access.value) == [mine] and access.value[mine].value == expires
        assert coordinator.get("run_bans", latest=True) is None
    finally:
        attacker.shutdown()
        coordinator.shutdown()


def _serve_state(maddrs_out, allow_in, done) -> None:
    """A trusted averager (guarded) that serves its state; stores an access record for the id it is sent."""
    from hivemind.averaging import DecentralizedAverager

    multiprocessing.set_start_method("fork", force=True)  # a spawned child inherits 'spawn'; hivemind forks
    tag = reducer.owner_tag()
    reducer.install("guard", tag)
    dht = swarm.start_dht([], client_mode=False, record_validators=reducer.validators("guard", tag))
    averager = DecentralizedAverager([torch.arange(8.0)], dht, prefix="guard", start=True, target_group_size=2)
    maddrs_out.put(swarm.visible_maddrs(dht))
    allowed = allow_in.get(timeout=120)
    dht.store("guard_access", subkey=reducer.subkey(allowed, tag), value=time.time() + 60,
              expiration_time=time.time() + 60)
    done.wait(120)
    averager.shutdown()
    dht.shutdown()


@pytest.mark.timeout(180)
def test_a_peer_without_an_access_record_gets_no_state():
    from hivemind.averaging import DecentralizedAverager

    ctx = multiprocessing.get_context("spawn")
    maddrs, allow, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve_state, args=(maddrs, allow, done))
    server.start()
    dht = averager = None
    try:
        dht = swarm.start_dht(maddrs.get(timeout=120), client_mode=True)
        averager = DecentralizedAverager([torch.zeros(8)], dht, prefix="guard", start=True, client_mode=True)
        assert averager.load_state_from_peers(timeout=10) is None  # refused: no access record yet
        allow.put(dht.peer_id.to_base58())
        time.sleep(2.0)  # the record is stored; the guard's cache holds a refusal for at most a second
        loaded = averager.load_state_from_peers(timeout=10)
        assert loaded is not None and torch.equal(loaded[1][0], torch.arange(8.0))
    finally:
        done.set()
        for part in (averager, dht):
            if part is not None:
                part.shutdown()
        server.join(10)
        if server.is_alive():
            server.kill()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_an_extra_trusted_reducer_takes_part_in_the_rounds(tmp_path):
    """`hivegym-launch --reducer-for` in its own process (another host, as far as hivemind can tell): it registers
    with the coordinator's key, both trusted peers admit each other and the volunteers, and the swarm solves."""
    import json

    from procs import Proc, start_coordinator, start_peer, wait_for

    coordinator, _ = start_coordinator(tmp_path, "--target-return", "475", "--max-minutes", "5", "--no-dashboard",
                                       "--set", "distill_sizes=''")
    join = json.loads((tmp_path / "coordinator.json").read_text())["join"]
    extra = Proc(["hivegym.coordinator.cli", "--reducer-for", join, "--identity", str(tmp_path / "coordinator.key")],
                 tmp_path / "reducer.log")
    peers = []
    try:
        wait_for(lambda: "trusted reducer registered" in coordinator.text(), 60, "the reducer to register")
        peers = [start_peer(tmp_path, join, f"p{i}") for i in range(2)]
        wait_for(lambda: coordinator.popen.poll() is not None, 360, "the run to end")
    finally:
        for peer in peers:
            peer.stop()
        extra.stop()
        coordinator.stop()
    assert json.loads((tmp_path / "summary.json").read_text())["reached"], coordinator.text()[-2000:]
    log = extra.text()
    assert log.count(" epoch ") >= 3, log[-2000:]  # it stepped through rounds with the swarm
    assert "refused averager access" not in log and "refused averager access" not in coordinator.text()
