"""Executing read items: coalesced preads into bounded, reusable buffers (pinned, with
asynchronous copies, on CUDA), copy-on-write views of a checkpoint's pages on the CPU,
and the tensors of pickled `.bin` files. Knows nothing of where the read items came from.

Example::

    stats = read_tensors([meta.located(root) for meta in metas], destinations)
"""

from .mapped import map_tensors
from .reader import ReadProgress, ReadStats, read_tensors

__all__ = ["ReadStats", "ReadProgress", "read_tensors", "map_tensors"]
