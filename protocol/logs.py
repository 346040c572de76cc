"""Logging for the command-line programs: our lines at the chosen level, hivemind's at WARNING, minus its
known harmless shutdown noise."""

from __future__ import annotations

import logging
import os
import warnings

HARMLESS = (
    "'_asyncio.Future' object has no attribute 'finalize'",
    "did not shut down within the grace period",
    "Task was destroyed but it is pending",  # hivemind's background loops, collected at exit
)


class DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in HARMLESS)


def setup_logging(level: str = "INFO") -> None:
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(DropHarmless())
    logging.getLogger("asyncio").addFilter(DropHarmless())
    root = logging.getLogger("hivegym")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
