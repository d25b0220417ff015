"""Executing read items: segments of coalesced, chunked preads shared by a pool of
threads, straight into CPU tensors or through bounded staging rings (pinned and
double-buffered, with asynchronous copies and the cast on the device, on CUDA), optional
O_DIRECT; copy-on-write views of a checkpoint's pages on the CPU; and the tensors of
pickled `.bin` files. Knows nothing of where the read items came from.

Files: `reader` (the entry point), `segments` (planning the reads, pure), `worker` (one
thread's work), `staging` (the staging ring and the copies out of it), `pinned`
(page-locked host memory of an exact size, and the CPU tier's arena), `direct` (opening
files, O_DIRECT and aligned reads), `mapped` (CPU pages), `stats`.

Example::

    stats = read_tensors([meta.located(root) for meta in metas], destinations, workers=4)
"""

from .mapped import map_tensors
from .reader import DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES, ReadProgress, read_tensors
from .stats import ReadStats

__all__ = ["ReadStats", "ReadProgress", "read_tensors", "map_tensors", "DEFAULT_STAGING_BYTES",
           "MIN_STAGING_BYTES"]
