"""hivegym-pull and hivegym-play: the command-line flows (arguments, progress, output, exit status) over
pull.py and play.py. Heavy modules load after argparse.

    hivegym-pull --coordinator HOST:PORT#KEY --list
    hivegym-pull --coordinator HOST:PORT#KEY --size tiny -o policies/
    hivegym-play policies/CartPole-v1-tiny.json --episodes 20 --record tiny.gif
    python -m hivegym.distill.cli pull|play ARGS...
"""

from __future__ import annotations

import json
import sys
import time

from hivegym.distill import play, pull


class Progress:
    """One line on stderr, redrawn in place on a terminal."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.tty, self.last = name, total, sys.stderr.isatty(), 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not (final or self.tty and time.monotonic() - self.last > 0.1):
            return
        self.last = time.monotonic()
        filled = int(30 * done / max(self.total, 1))
        print(f"\r{self.name} [{'#' * filled}{'.' * (30 - filled)}] {100 * done / max(self.total, 1):5.1f}% "
              f"{done / 1024:.1f}/{self.total / 1024:.1f} KiB", end="\n" if final else "", file=sys.stderr, flush=True)


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def pull_main(argv: list[str] | None = None) -> int:
    args = pull.parse_args(argv)
    try:
        from hivegym.protocol.identity import peer_id

        public_key, client = pull.connect(args)
        try:
            if args.list:
                entries = pull.list_entries(client, public_key)
                for _, error in entries:
                    if error:
                        print(f"hivegym-pull: not listed: {error}", file=sys.stderr)
                good = [m for m, _ in entries if m is not None]
                print(pull.table(good) if good else "no signed checkpoints yet")
                return 0
            chosen = pull.choose(pull.list_entries(client, public_key), args)
            bar = Progress(chosen["name"], chosen["weights"]["bytes"])
            saved = pull.fetch(client, chosen, public_key, args.output, args.retries, bar.update)
        finally:
            client.close()
        print(f"saved {saved} and {saved.with_suffix('.pt')} (sha256 and signature of coordinator "
              f"{peer_id(public_key)} verified)")
        return 0
    except pull.PullError as e:
        print(f"hivegym-pull: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def play_main(argv: list[str] | None = None) -> int:
    args = play.parse_args(argv)
    try:
        result = play.play(args)
    except play.PlayError as e:
        print(f"hivegym-play: {one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    commands = {"pull": pull_main, "play": play_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m hivegym.distill.cli pull|play ARGS...")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
