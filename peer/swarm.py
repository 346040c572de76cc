"""The only module that imports hivemind: DHT, Optimizer, codecs and the sync guards around them."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import hivemind
import numpy as np
import torch
from hivemind.compression import (CompressionBase, Float16Compression, NoCompression, SizeAdaptiveCompression,
                                  quantization, serialization)
from hivemind.averaging import key_manager, matchmaking
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from hivegym.protocol.config import RunConfig
from hivegym.protocol.logs import DropHarmless

logger = logging.getLogger(__name__)
for _handler in logging.getLogger("hivemind").handlers:
    _handler.addFilter(DropHarmless())


class Uniform8Bit(quantization.Uniform8BitQuantization):
    """hivemind 1.1.12's decoder calls int() on a 1-element array, an error on numpy >= 2.4."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


class Blockwise8Bit(quantization.BlockwiseQuantization):
    """Same numpy >= 2.4 fix for the blockwise (bitsandbytes) decoder."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_blockwise

        buffer = serialized_tensor.buffer
        absmax_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook_size = int(np.frombuffer(buffer, offset=8, count=1, dtype=np.int64)[0])
        absmax = np.frombuffer(buffer, offset=16, count=absmax_size, dtype=self.codebook_dtype)
        codebook = np.frombuffer(buffer, offset=16 + absmax.nbytes, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=16 + absmax.nbytes + codebook.nbytes, dtype=self.indices_dtype)
        result = dequantize_blockwise(
            torch.as_tensor(quantized).reshape(tuple(serialized_tensor.size)), absmax=torch.as_tensor(absmax),
            code=torch.as_tensor(codebook), blocksize=quantization._BLOCKWISE_QUANTIZATION_BLOCKSIZE, nested=False,
        )
        return result.to(getattr(torch, serialized_tensor.dtype)).requires_grad_(serialized_tensor.requires_grad)


# Receivers decode by looking the wire type up in this table; replace the broken decoders before any
# averager forks, so every process of this peer decodes 8-bit parts correctly.
serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()
serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"] = Blockwise8Bit()


def compression(name: str) -> CompressionBase:
    """The codec for averaged tensors; tiny tensors (biases) always go uncompressed."""
    codec = {
        "none": NoCompression(),
        "float16": Float16Compression(),
        "uint8": Uniform8Bit(),
        "blockwise8bit": Blockwise8Bit(),
    }[name]
    return SizeAdaptiveCompression(threshold=2**10, less=NoCompression(), greater_equal=codec)


def start_dht(initial_peers: list[str], client_mode: bool, host_maddrs: list[str] | None = None,
              announce_maddrs: list[str] | None = None, use_relay: bool = True, use_auto_relay: bool = False,
              record_validators: list | None = None) -> hivemind.DHT:
    """Start a DHT node; raises with hivemind's reason if the bootstrap peers cannot be reached.
    use_relay: dial peers behind NAT through circuit relays (and serve as a relay: p2pd's default);
    use_auto_relay: behind NAT, reserve a slot at a relay (the bootstrap peers) and announce it."""
    return hivemind.DHT(
        initial_peers=initial_peers, client_mode=client_mode, start=True,
        host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"], announce_maddrs=announce_maddrs,
        use_relay=use_relay, use_auto_relay=use_auto_relay, record_validators=record_validators or (),
    )


def check_p2p_daemon(host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None,
                     use_relay: bool = True, use_auto_relay: bool = False, timeout: float = 15.0) -> str | None:
    """Start a bare p2p daemon with these options and stop it; None if it started, else hivemind's reason."""

    async def probe() -> str | None:
        try:
            p2p = await P2P.create(host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"],
                                   announce_maddrs=announce_maddrs, use_relay=use_relay,
                                   use_auto_relay=use_auto_relay, startup_timeout=timeout)
        except Exception as e:  # any reason it cannot start is reported, in one line
            await asyncio.sleep(0.5)  # asyncio reaps the dead daemon before the loop closes, or it warns
            return " ".join(str(e).split()) or type(e).__name__
        await p2p.shutdown()
        return None

    return asyncio.run(probe())


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def follow_only(leaders: set[str]) -> None:
    """Join averaging groups led by these hivemind peers only (the trusted reducers); call before the averagers
    fork. A client never reduces, but the leader it joins does: a volunteer running as a full peer could otherwise
    lead honest clients into a group it reduces itself."""
    request = matchmaking.Matchmaking.__dict__.get("_hivegym_original") or matchmaking.Matchmaking._request_join_group

    async def request_join_group(self, leader):
        if leader.to_base58() not in leaders:
            logger.debug("not joining a group led by %s: not a trusted reducer", leader)
            return None
        return await request(self, leader)

    matchmaking.Matchmaking._hivegym_original = request
    matchmaking.Matchmaking._request_join_group = request_join_group


LEADER_POLL_S = 0.1  # at most one DHT request for leaders per this many seconds, per averager


def throttle_leader_search() -> None:
    """hivemind's matchmaking asks the DHT for leaders again as soon as its queue runs empty, ~100 times a second
    per waiting averager here: the DHT, not the tensors, was most of every peer's traffic, and more so with each
    extra DHT server (an extra reducer multiplied the coordinator's bytes per step by 9). Call before the
    averagers fork."""
    manager = key_manager.GroupKeyManager
    request = manager.__dict__.get("_hivegym_original") or manager.get_averagers

    async def get_averagers(self, group_key, only_active):
        wait = getattr(self, "_hivegym_asked", 0.0) + LEADER_POLL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._hivegym_asked = time.monotonic()
        return await request(self, group_key, only_active)

    manager._hivegym_original = request
    manager.get_averagers = get_averagers


def peer_ids(maddrs: list[str]) -> set[str]:
    """The hivemind peer ids in multiaddrs (their /p2p/ part)."""
    return {m.rsplit("/p2p/", 1)[1].split("/")[0] for m in maddrs if "/p2p/" in m}


def make_optimizer(dht: hivemind.DHT, policy: torch.nn.Module, config: RunConfig, client_mode: bool
                   ) -> hivemind.Optimizer:
    """hivemind.Optimizer with local updates and parameter averaging every target_batch_size samples. Client mode
    is set on the DHT and here together: hivemind 1.1.12 ignores the Optimizer's flag unless the DHT is a client too."""
    throttle_leader_search()
    opt = hivemind.Optimizer(
        dht=dht, run_id=config.run_id, target_batch_size=config.target_batch_size,
        # each batch's PPO update is computed by peer/worker.py (it must be replayable for audits), so hivemind's own
        # local step is a no-op and hivemind only counts samples and averages parameters
        optimizer=partial(torch.optim.SGD, lr=0.0), params=policy.parameters(),
        matchmaking_time=config.matchmaking_time, averaging_timeout=config.averaging_timeout,
        load_state_timeout=config.load_state_timeout, client_mode=client_mode, verbose=False,
        state_averaging_compression=compression(config.compression),
        # request_timeout must stay below matchmaking_time, or matchmaking can deadlock (hivemind's note)
        averager_opts=dict(request_timeout=config.matchmaking_time / 2),
        # a full peer must notice that the swarm reached its target well inside a client's matchmaking
        # window, or the client's round finds no group and it ends the epoch alone
        tracker_opts=dict(min_refresh_period=0.05, max_refresh_period=config.matchmaking_time / 3),
        # delayed (background) averaging would still block every local step until the round ends (hivemind's
        # delta rule), so average synchronously: params are then exactly the group's average after each epoch
        use_local_updates=True, delay_state_averaging=False,
    )
    weigh_rounds_by_samples(opt)
    return opt


def weigh_rounds_by_samples(opt: hivemind.Optimizer) -> None:
    """This peer's weight in a parameter-averaging round: the samples it accumulated in the epoch (at least 1, so a
    round never has a zero total), not hivemind's 1 per peer, under which a peer that contributed little (the
    coordinator's trusted peer, a slow volunteer) counted as much as any other. hivemind passes no weight to the state
    averager's rounds, so this wraps that averager's step (this instance only) to put the weight on the round,
    scheduled or not."""
    averager_step = opt.state_averager.step

    def step(*args, averaging_round: bool = False, averaging_control=None, averaging_opts=None, **kwargs):
        if averaging_round:
            weight = float(max(opt.tracker.local_progress.samples_accumulated, 1))
            if averaging_control is not None:
                averaging_control.weight = weight
            averaging_opts = {**(averaging_opts or {}), "weight": weight}
        return averager_step(*args, averaging_round=averaging_round, averaging_control=averaging_control,
                             averaging_opts=averaging_opts, **kwargs)

    opt.state_averager.step = step


def step(opt: hivemind.Optimizer, samples: int) -> int | None:
    """One optimizer step for a batch of `samples`; returns the new epoch if this step began one."""
    epoch = opt.local_epoch
    opt.step(batch_size=samples)
    return opt.local_epoch if opt.local_epoch != epoch else None


def reducers_present(opt: hivemind.Optimizer) -> bool:
    """True once the tracker sees a non-client peer (one that can reduce and serve state)."""
    progress = opt.tracker.global_progress
    return progress.num_peers - progress.num_clients > 0


def wait_for_reducer(opt: hivemind.Optimizer, timeout: float) -> bool:
    """A client that steps before it sees a reducer falls back to local steps and drifts for good."""
    deadline = time.monotonic() + timeout
    while not reducers_present(opt):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def resync(opt: hivemind.Optimizer, epoch: int) -> None:
    """Bring a client that ran ahead of the reducers back to their epoch and state.

    A client whose averaging round found no group still ends its epoch; once ahead, its samples no longer
    count towards the reducers' epoch and hivemind treats it as in sync for good. load_state_from_peers
    refuses a donor behind the local epoch, and the tracker's cached global epoch would put the client
    back ahead, so both are set back first."""
    opt.state_averager.local_epoch = epoch
    opt.tracker.global_progress.epoch = epoch
    opt.tracker.report_local_progress(epoch, 0)
    opt.load_state_from_peers()


def shutdown(opt: hivemind.Optimizer | None, dht: hivemind.DHT | None) -> None:
    for part in (opt, dht):
        if part is None:
            continue
        try:
            part.shutdown()
        except Exception as e:  # shutting down: log and keep going so the DHT still stops
            logger.debug("hivemind shutdown raised %r", e)
