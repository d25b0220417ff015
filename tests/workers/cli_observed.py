"""The CLI (`distload.cli.main.main`) under torchrun, with its reads observed.

Every read the loader makes is announced on stderr (``spy: rank R read N bytes``), so a
test can tell that a run stopped before reading any weight. With
``DISTLOAD_TEST_SLOW_RANK=R`` and ``DISTLOAD_TEST_SLOW_SECONDS=S``, rank R stalls S
seconds once, just after starting to read its first file (a slow disk), for the progress
and stall messages.

    torchrun --nproc_per_node=2 cli_observed.py --device cpu --model CKPT ...
"""

import os
import sys
import time

from distload.io import PosixReader
from distload.cli.main import main

RANK = int(os.environ.get("RANK", "0"))
SLOW_RANK = int(os.environ.get("DISTLOAD_TEST_SLOW_RANK", "-1"))
SLOW_SECONDS = float(os.environ.get("DISTLOAD_TEST_SLOW_SECONDS", "0"))
_stalled = []


def _slowed(progress):
    def call(file, nbytes):
        if progress is not None:
            progress(file, nbytes)
        if RANK == SLOW_RANK and not _stalled:
            _stalled.append(file)
            time.sleep(SLOW_SECONDS)
    return call


def _spy(fn, name):
    def wrapped(self, *args, progress=None, **kwargs):
        result = fn(self, *args, progress=_slowed(progress), **kwargs)
        stats = result[1] if isinstance(result, tuple) else result
        what = "offload" if kwargs.get("workers") else name   # the offload store reads one at a time
        print(f"spy: rank {RANK} read {stats.bytes_read} bytes ({what})", file=sys.stderr, flush=True)
        return result
    return wrapped


PosixReader.map = _spy(PosixReader.map, "mapped")
PosixReader.read = _spy(PosixReader.read, "read")
sys.exit(main(sys.argv[1:]))
