"""The round check: what a peer sent into an averaging round against the receipts it handed in for that epoch.

The trusted reducer sees every sender's whole vector and reports its sketch (hivemind id -> sketch); a peer sends
the epoch's parameters plus the mean of its batches' contributions, so that sketch must be its receipts'
parameter sketch plus the mean of their contribution sketches (the projection of a sum is the sum of the
projections), up to the codec's rounding. Anything else means it put something into the average that its
receipts do not say, and no replay is needed to see it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from hivegym.coordinator.ledger import Ledger
from hivegym.protocol.receipt import Receipt, decode_receipt

logger = logging.getLogger(__name__)

SENT_CHECK_DELAY_S = 5.0  # a round's last receipts arrive after it (a receipt follows its batch's step)
SENT_RTOL = 0.5  # what a peer sent vs its receipts, relative to its contribution (see sent_error)
CODEC_RTOL = 2e-3  # float16 rounding of the parameters, relative to their sketch
MAX_ROUNDS = 1000  # rounds waiting for their check


def sent_error(sent: list[float], receipts: list[Receipt]) -> float:
    """|sketch(sent) - (params sketch + mean contribution sketch)|, less the codec's share, relative to the mean
    contribution's sketch: small for an honest peer, 4.7-11 here for one that sends its contribution times -10.
    The receipts share their parameters; the smallest error over the means of their last k batches counts, since a
    peer that reloaded the swarm's state (or failed to) starts its mean afresh."""
    params = receipts[0].params_sketch
    receipts = sorted(receipts, key=lambda r: r.batch)
    errors = []
    for first in range(len(receipts)):
        tail = receipts[first:]
        mean = [sum(values) / len(tail) for values in zip(*(r.update_sketch for r in tail))]
        error = math.hypot(*(s - p - m for s, p, m in zip(sent, params, mean)))
        errors.append(max(0.0, error - CODEC_RTOL * math.hypot(*params)) / max(math.hypot(*mean), 1e-12))
    return min(errors)


class RoundCheck:
    """add_sent from the main thread, note_drift from the gRPC threads, check from the main thread."""

    def __init__(self, ledger: Ledger, strike: Callable[[str, str], None]):
        self.ledger, self.strike = ledger, strike
        self.lock = threading.Lock()
        self.sent: deque[tuple[float, int, dict[str, list[float]]]] = deque(maxlen=MAX_ROUNDS)
        self.drifted: dict[str, set[int]] = {}  # peer id -> labels of its receipts refused as off the swarm's params

    def add_sent(self, epoch: int, sent: dict[str, list[float]]) -> None:
        """Sketches of what each sender (by hivemind id) put into the round that ended `epoch`; checked once the
        receipts of that epoch are in."""
        self.sent.append((time.monotonic() + SENT_CHECK_DELAY_S, epoch, sent))

    def note_drift(self, pid: str, epoch: int) -> None:
        """A receipt of this peer and label was refused as off the swarm's parameters: its rounds nearby are sent
        from parameters with no receipts to compare with, and are not checked."""
        with self.lock:
            self.drifted.setdefault(pid, set()).add(epoch)

    def forget_before(self, epoch: int) -> None:
        with self.lock:
            for labels in self.drifted.values():
                labels.difference_update([e for e in labels if e < epoch])

    def check(self) -> None:
        """Strike every peer whose rounds, due for their check, contradict its receipts."""
        now = time.monotonic()
        while self.sent and self.sent[0][0] <= now:
            _, epoch, sent = self.sent.popleft()
            for libp2p_id, sent_sketch in sent.items():
                pid = self.ledger.peer_by_libp2p_id(libp2p_id)
                if pid is None:  # the coordinator's own peer
                    continue
                with self.lock:
                    drifted = self.drifted.get(pid, set()) & {epoch - 1, epoch, epoch + 1}
                if drifted:
                    logger.debug("peer %s: round %d not checked (receipts of epoch %s were off the swarm's "
                                 "parameters)", pid, epoch, sorted(drifted))
                    continue
                groups: dict[tuple[int, tuple[float, ...]], list[Receipt]] = {}  # (label, params) -> receipts
                for data in self.ledger.receipts(pid, epoch - 1, epoch + 1):
                    receipt = decode_receipt(data)
                    groups.setdefault((receipt.epoch, tuple(receipt.params_sketch)), []).append(receipt)
                errors = [sent_error(sent_sketch, receipts) for receipts in groups.values()]
                if errors and min(errors) > SENT_RTOL:
                    self.strike(pid, f"what it sent into the round that ended epoch {epoch} is not what its "
                                     f"receipts say (off by {min(errors):.2g} of its contribution)")
