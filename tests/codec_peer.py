"""One full hivemind peer for tests/test_codecs.py: its weights moved by VALUE * LR, one averaging round, JSON out.

usage: python codec_peer.py CODEC VALUE SAMPLES [BOOTSTRAP_MADDR]
Prints {"maddrs": [...]} once its DHT is up, then {"epoch": .., "moved": [..], "weight": [..]} at the end.
"""

import dataclasses
import json
import sys
import time

import torch

from hivegym.peer import swarm
from hivegym.protocol.config import RunConfig

LR = 0.01


def main() -> None:
    codec, value, samples, *bootstrap = sys.argv[1:]
    config = dataclasses.replace(RunConfig(), run_id=f"codec-{codec}", compression=codec, target_batch_size=128,
                                 learning_rate=LR, matchmaking_time=5.0, averaging_timeout=30.0)
    # a wide matchmaking window: on a loaded CI machine the second peer can enter its round seconds late
    dht = swarm.start_dht(bootstrap, client_mode=False)
    print(json.dumps({"maddrs": swarm.visible_maddrs(dht)}), flush=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)  # 4160 parameters: above the size where compression applies
    before = model.weight.detach().clone()
    opt = swarm.make_optimizer(dht, model, config, client_mode=False)
    with torch.no_grad():  # what this peer brings into the round: its start moved by value * LR
        model.weight += float(value) * LR
    opt.step(batch_size=1)  # publishes this peer's progress
    deadline = time.monotonic() + 90
    while opt.tracker.global_progress.num_peers < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # a peer that steps before it sees the other would step alone
    opt.step(batch_size=int(samples))  # this peer's weight in the round: 1 + samples + its steps below
    while (opt.local_epoch < 1 and opt.tracker.global_progress.samples_accumulated < 128
           and time.monotonic() < deadline):
        time.sleep(0.1)  # both peers' samples are in before anyone triggers the round
    steps = 0
    while opt.local_epoch < 1 and time.monotonic() < deadline:
        opt.step(batch_size=1)
        steps += 1
        time.sleep(0.05)
    moved = (model.weight.detach() - before).flatten()
    print(json.dumps({"epoch": opt.local_epoch, "steps": steps, "moved": moved[:256].tolist(),
                      "weight": model.weight.detach().flatten()[:256].tolist()}), flush=True)
    swarm.shutdown(opt, dht)


if __name__ == "__main__":
    main()
