"""The `Reader` seam (`base`: the interface and its `ReadOptions`) and the POSIX reader
(`posix`). Executing read items: segments of coalesced, chunked preads shared by a pool of
threads, straight into CPU tensors or through bounded staging rings (pinned and
double-buffered, with asynchronous copies and the cast on the device, on CUDA), optional
O_DIRECT; copy-on-write views of a checkpoint's pages on the CPU; and the tensors of
pickled `.bin` files. Knows nothing of where the read items came from.

Files: `base` (the seam), `posix` (the POSIX reader), `reader` (its entry point), `segments` (planning the reads, pure), `worker` (one
thread's work), `staging` (the staging ring and the copies out of it), `pinned`
(page-locked host memory of an exact size, and the CPU tier's arena), `direct` (opening
files, O_DIRECT and aligned reads), `mapped` (CPU pages), `stats`.

Example::

    stats = read_tensors([meta.located(root) for meta in metas], destinations, workers=4)
"""

from .base import DEFAULT_READ_WORKERS, DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES, Reader, ReadOptions, read_option
from .mapped import map_tensors
from .posix import PosixReader
from .reader import ReadProgress, read_tensors
from .stats import ReadStats

__all__ = ["Reader", "ReadOptions", "read_option", "PosixReader", "ReadStats", "ReadProgress", "read_tensors", "map_tensors",
           "DEFAULT_STAGING_BYTES", "MIN_STAGING_BYTES", "DEFAULT_READ_WORKERS"]
