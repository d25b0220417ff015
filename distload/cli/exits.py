"""How the CLI ends: one clear line and a documented exit code on every rank, on every
path — success, an error on any rank, a bad argument, Ctrl-C (SIGINT) or a scheduler's
SIGTERM (what Slurm sends at a time limit).

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | an error: a bad checkpoint or config, a failed rank, a full disk (the line says which) |
| 2 | usage: a bad flag or input, or ranks started with different arguments |
| 130 | interrupted by SIGINT (Ctrl-C) |
| 143 | terminated by SIGTERM |

The process leaves with `os._exit` once its output is flushed: Python's teardown would
destroy the process group's C++ worker threads while they may still run, which aborts
("terminate called without an active exception"); nothing is left to tear down by then.

Example::

    install_signal_handlers()
    try:
        code = run(cfg)
    except Interrupted as e:
        code = e.exit_code
    leave(code)
"""

from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = ["OK", "ERROR", "USAGE", "INTERRUPTED", "TERMINATED", "Interrupted",
           "install_signal_handlers", "leave"]

OK, ERROR, USAGE, INTERRUPTED, TERMINATED = 0, 1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM


class Interrupted(BaseException):
    """A signal asked this process to stop (a BaseException, as KeyboardInterrupt is, so
    that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise)


def leave(code: int) -> None:
    """Flush what this process wrote and exit with `code` at once (see the module doc)."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
