"""Replaying a receipt's batch: runs in the coordinator's audit worker process, never on the gRPC path.

Tolerances. A volunteer's parameters after an averaging round differ from the coordinator's by the codec's
rounding (float16 deltas: ~1e-5 of a parameter), so a replay can sample a different action where a draw falls
within that of a probability boundary; from there that env stream diverges. That is rare (a few streams in a
thousand) and a fabricated, re-seeded or stale batch diverges in nearly every stream from the first steps, so an
audit allows a minority of streams to diverge, compares episode returns on the streams that match, and compares
the contribution's sketch with a relative tolerance that such a divergence stays inside.
"""

from __future__ import annotations

import math

import torch

from hivegym.protocol.config import RunConfig
from hivegym.protocol.policy import build_policy
from hivegym.protocol.receipt import Receipt
from hivegym.protocol.rollout import Collector
from hivegym.protocol.work import batch_seeds, replay_batch, sketch, sketch_seed

PARAMS_RTOL = 1e-3  # parameters sketch vs the epoch's: codec rounding is ~1e-5, one epoch of training ~1e-2
MAX_DIVERGED = 0.25  # share of env streams whose actions may differ from the replay
RETURN_RTOL = 1e-4
# The contribution's sketch against the replay's: honest replays from rounded parameters were off by up to 0.76
# (relative; late in a long run, when updates are small and Adam's normalisation amplifies rounding), so the check is
# on direction and size: a random contribution points elsewhere (cosine ~0), a scaled one (x -10) backwards or too
# long, a zero one (a peer that computes nothing) too short
MIN_COSINE = 0.5
NORM_RATIO = (0.5, 2.0)


def sketch_distance(a: list[float], b: list[float]) -> float:
    """Relative L2 distance |a - b| / |b|; inf (never OverflowError) where a peer's sketch is huge."""
    norm = math.hypot(*b) or 1e-12
    return math.hypot(*(x - y for x, y in zip(a, b))) / norm


def audit_receipt(config_json: str, public_key: bytes, receipt: Receipt, state: dict) -> tuple[str, str]:
    """Replay the batch with `state`, the parameters of the epoch the receipt's parameter sketch names.
    Returns (verdict, detail): 'passed' or 'failed'."""
    torch.set_num_threads(1)
    config = RunConfig.from_json(config_json)
    policy = build_policy(config.env_id, config.hidden_width, config.hidden_layers, config.seed)
    policy.load_state_dict(state)
    seeds = batch_seeds(config.run_id, public_key, receipt.epoch, receipt.batch)
    collector = Collector(config.env_id, config.num_envs, seeds.envs)
    try:
        work = replay_batch(policy, config, collector, seeds)
    finally:
        collector.close()
    digests = work.rollout.action_digests()
    if len(receipt.actions) != len(digests) or len(receipt.returns) != len(digests):
        return "failed", f"the receipt has {len(receipt.actions)} env streams; the run has {len(digests)}"
    matched = [i for i, d in enumerate(digests) if d == receipt.actions[i]]
    diverged = len(digests) - len(matched)
    if diverged > MAX_DIVERGED * len(digests):
        return "failed", f"actions differ from the replay in {diverged} of {len(digests)} env streams"
    for i in matched:
        replayed = work.rollout.env_returns[i]
        claimed = receipt.returns[i]
        if len(replayed) != len(claimed) or any(abs(a - b) > RETURN_RTOL * max(1.0, abs(b))
                                                for a, b in zip(claimed, replayed)):
            return "failed", f"episode returns of env stream {i} are {claimed[:4]}, the replay gives {replayed[:4]}"
    update = sketch(work.update, config.sketch_dim, sketch_seed(config.run_id))
    if len(receipt.update_sketch) != len(update):
        return "failed", "update_sketch has the wrong length"
    cosine, ratio = _cosine_and_ratio(receipt.update_sketch, update)
    if cosine < MIN_COSINE or not NORM_RATIO[0] <= ratio <= NORM_RATIO[1]:
        return "failed", (f"the contribution's sketch is not the replay's (cosine {cosine:.2g}, length ratio "
                       f"{ratio:.2g})")
    return "passed", f"{len(matched)}/{len(digests)} streams match, sketch cosine {cosine:.3g}, length ratio {ratio:.3g}"


def _cosine_and_ratio(claimed: list[float], replayed: list[float]) -> tuple[float, float]:
    """Cosine of the angle between two sketches and |claimed| / |replayed| (overflow-safe)."""
    a, b = math.hypot(*claimed), math.hypot(*replayed)
    if not (math.isfinite(a) and a > 0 and b > 0):
        return -1.0, math.inf if a > 0 else 0.0
    return sum((x / a) * (y / b) for x, y in zip(claimed, replayed)), a / b
