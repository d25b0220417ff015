"""One logger for the library, its records prefixed with the rank that wrote them."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("distload")


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | int = "INFO") -> None:
    """Give the distload logger a rank-prefixed stderr handler (the CLI calls this once)."""
    if any(getattr(h, "_distload", False) for h in logger.handlers):
        logger.setLevel(level)
        return
    handler = _StderrHandler()
    handler._distload = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
