"""A cheating volunteer: the real hivegym-join with one part replaced. Run from the repository root:

    python -m tests.adversaries.peer CHEAT --coordinator HOST:PORT#KEY --name NAME --identity FILE

Each cheat patches the real peer code (peer/volunteer.py, peer/worker.py) in this process only, then runs
hivegym-join's main(). CHEATS names them and says how the coordinator catches each.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import grpc
import torch

from hivegym.peer import cli, volunteer, worker
from hivegym.protocol.identity import Identity
from hivegym.protocol.receipt import RECEIPT_PREFIX, Receipt
from hivegym.protocol.work import BatchSeeds

logger = logging.getLogger("hivegym.adversary")

CHEATS = {
    "fabricated_returns": "claims a return of 500 for every env stream: audits replay the batch and fail",
    "random_gradients": "sends a random contribution (its receipts sketch what it sent): the audit's sketch differs",
    "scaled_gradients": "sends its contribution times -10: the audit's sketch differs",
    "own_seeds": "collects with seeds of its own choosing: the replayed actions differ",
    "stale_params": "collects with the parameters of its first epoch, claiming the current ones: actions differ",
    "replayed_receipt": "hands in every receipt twice: the second copy is refused as a duplicate",
    "forged_signature": "signs its receipts with a key that is not its own: refused as unauthenticated",
    "no_token": "never binds a token to its hivemind id: trusted averagers refuse it",
    "expired_token": "never renews its token: its receipts and its averaging are refused once it expires",
    "banned_keeps_running": "fabricates returns and goes on after its ban, reloading the swarm's state: receipts, "
                            "renewal, state and averaging refused",
    "sends_other": "hands in honest receipts but sends its contribution times -10 into the rounds: the reducer's "
                   "sketch of what it sent contradicts its receipts",
}


def install(cheat: str) -> None:
    if cheat in ("fabricated_returns", "banned_keeps_running"):
        honest = volunteer.make_receipt

        def make_receipt(*args, **kwargs) -> Receipt:
            receipt = honest(*args, **kwargs)
            return dataclasses.replace(receipt, returns=[[500.0] for _ in receipt.returns])

        volunteer.make_receipt = make_receipt
    if cheat == "banned_keeps_running":
        submit = volunteer.Session.submit

        def keep_submitting(self, receipt):
            try:
                return submit(self, receipt)
            except volunteer.JoinFailed as e:  # banned: an honest peer stops here
                logger.warning("ignoring: %s", e)
                return None, True  # and asks for the swarm's state, which the trusted peers refuse it

        volunteer.Session.submit = keep_submitting
    if cheat in ("random_gradients", "scaled_gradients"):
        honest_contribution = worker.contribution

        def contribution(*args, **kwargs) -> torch.Tensor:
            update = honest_contribution(*args, **kwargs)
            if cheat == "scaled_gradients":
                return update * -10.0
            return torch.randn_like(update) * update.norm() / update.numel() ** 0.5

        worker.contribution = contribution
    if cheat == "sends_other":
        worker.round_input = lambda epoch: epoch.params - 10.0 * epoch.total / epoch.count
    if cheat == "own_seeds":
        volunteer.batch_seeds = lambda *args: BatchSeeds(envs=12345, actions=1, shuffle=2)
    if cheat == "stale_params":
        honest_init = worker.Epoch.__init__
        first = {}

        def init(self, *args, **kwargs) -> None:
            honest_init(self, *args, **kwargs)
            first.setdefault("behaviour", self.behaviour)
            self.behaviour = first["behaviour"]  # hash and sketch still describe the current parameters

        worker.Epoch.__init__ = init
    if cheat == "replayed_receipt":
        submit = volunteer.Session.submit

        def twice(self, receipt):
            reply = submit(self, receipt)
            submit(self, receipt)
            return reply

        volunteer.Session.submit = twice
    if cheat == "forged_signature":
        other = Identity.generate()
        volunteer.Receipt.sign = lambda self, identity: (self.encode(), other.sign(RECEIPT_PREFIX + self.encode()))
    if cheat == "no_token":
        volunteer.Session.renew = lambda self: logger.warning("not binding a token to its hivemind id")
    if cheat == "expired_token":
        volunteer.Session.renew_if_due = lambda self: None
    if cheat == "banned_keeps_running":
        renew_honestly = volunteer.Session.renew

        def renew(self):
            try:
                renew_honestly(self)
            except grpc.RpcError as e:
                logger.warning("renewal refused (%s); going on", e.code().name)

        volunteer.Session.renew = renew


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in CHEATS:
        print(f"usage: python -m tests.adversaries.peer {{{','.join(CHEATS)}}} HIVEGYM-JOIN-ARGS", file=sys.stderr)
        return 2
    cheat = sys.argv[1]
    install(cheat)
    logger.warning("cheating: %s (%s)", cheat, CHEATS[cheat])
    started = time.monotonic()
    code = cli.main(sys.argv[2:])
    logger.warning("cheat %s ended after %.0f s with exit code %d", cheat, time.monotonic() - started, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
