"""The real hivegym-join on a machine too loaded to start in time: its wait for the swarm's reducer takes DELAY
seconds longer, so the token it bound when its DHT started lapses before its state download unless it is renewed
meanwhile. Run from the repository root:

    python -m tests.slow_peer DELAY --coordinator HOST:PORT#KEY --name NAME --identity FILE
"""

from __future__ import annotations

import sys
import time

from hivegym.peer import cli, swarm


def main() -> int:
    delay = float(sys.argv.pop(1))
    wait_for_reducer = swarm.wait_for_reducer

    def slow_wait(opt, timeout: float) -> bool:
        time.sleep(delay)
        return wait_for_reducer(opt, timeout)

    swarm.wait_for_reducer = slow_wait
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
