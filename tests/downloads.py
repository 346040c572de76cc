"""A volunteer that only downloads the swarm's state: the real hivegym-join up to its training loop, which is
replaced by N downloads, each checked against the coordinator's signed hashes. Run from the repository root:

    python -m tests.downloads N --coordinator HOST:PORT#KEY --name NAME --identity FILE

Prints one JSON line: {"downloads": N, "matched": how many matched a signed hash}.
"""

from __future__ import annotations

import json
import sys
import time

from hivegym.peer import cli, volunteer


def main() -> int:
    count = int(sys.argv.pop(1))

    def download(options, config, session, opt, policy, device, stop) -> None:
        matched = 0
        for _ in range(count):
            try:
                volunteer.load_verified_state(opt, policy, session, timeout=0.0)
                matched += 1
            except volunteer.JoinFailed:
                pass
            time.sleep(0.3)
        print(json.dumps({"downloads": count, "matched": matched}), flush=True)

    volunteer.train = download
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
