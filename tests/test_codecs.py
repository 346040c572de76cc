"""Every codec in a real hivemind all-reduce between two full peers in separate processes.

Each peer contributes 65 samples of a constant gradient (A: +1, B: -5) and then zero gradients until the
round runs, so the swarm's average is negative and in gradient mode Adam moves every weight of both peers
up. A peer whose round failed (as it does when the receiving side cannot decode an 8-bit part) falls back
to its own gradient: A would move down and the peers would disagree. In local mode each peer steps on its
own gradient (in opposite directions) and parameter averaging must leave both with the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
LR = 0.01
PEER = str(Path(__file__).with_name("codec_peer.py"))


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PEER, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("sync_mode,codec", [
    ("grad", "none"), ("grad", "float16"), ("grad", "uint8"), ("grad", "blockwise8bit"), ("grad", "powersgd"),
    ("local", "float16"), ("local", "uint8"), ("local", "blockwise8bit"),
])
def test_codec_in_real_allreduce(sync_mode, codec):
    a = start(sync_mode, codec, "1.0")
    try:
        maddrs = json.loads(a.stdout.readline())["maddrs"]
        b = start(sync_mode, codec, "-5.0", *maddrs)
        out_b, _ = b.communicate(timeout=150)
        out_a, _ = a.communicate(timeout=150)
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
    result_a = json.loads(out_a.strip().splitlines()[-1])
    result_b = json.loads(out_b.strip().splitlines()[-1])
    assert result_a["epoch"] >= 1 and result_b["epoch"] >= 1, (result_a["steps"], result_b["steps"])
    moved = torch.tensor(result_a["moved"])
    if sync_mode == "grad":  # Adam's update is about lr * sign(average gradient)
        assert (moved > 0.5 * LR).float().mean() > 0.95, f"A did not follow the average: {moved.mean()}, steps {result_a['steps']}:{result_b['steps']}"
    gap = (torch.tensor(result_a["weight"]) - torch.tensor(result_b["weight"])).abs().max().item()
    assert gap < 0.2 * LR, f"peers disagree by {gap} after {codec} averaging"
