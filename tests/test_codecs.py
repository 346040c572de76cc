"""Every codec in a real hivemind all-reduce between two full peers in separate processes.

Both start from the same weights; A moves its own by +LR and B by -5 LR before the round, A reporting 65 samples and
B 641. Parameter averaging must leave both with the same weights, at the sample-weighted mean of the two (about
-4.5 LR from the start; an unweighted mean would be -2 LR). A peer whose round failed (as it does when the receiving
side cannot decode an 8-bit part) keeps its own: A would stay above its start and the peers would disagree.
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


@pytest.mark.parametrize("codec", ["none", "float16", "uint8", "blockwise8bit"])
def test_codec_in_real_allreduce(codec):
    a = start(codec, "1.0", "64")
    try:
        maddrs = json.loads(a.stdout.readline())["maddrs"]
        b = start(codec, "-5.0", "640", *maddrs)
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
    weight_a, weight_b = 1 + 64 + result_a["steps"], 1 + 640 + result_b["steps"]  # the samples each accumulated
    expected = LR * (weight_a * 1.0 + weight_b * -5.0) / (weight_a + weight_b)
    assert abs(moved.mean().item() - expected) < 0.2 * LR, \
        f"A moved {moved.mean()}, not the weighted mean {expected}; steps {result_a['steps']}:{result_b['steps']}"
    gap = (torch.tensor(result_a["weight"]) - torch.tensor(result_b["weight"])).abs().max().item()
    assert gap < 0.2 * LR, f"peers disagree by {gap} after {codec} averaging"
