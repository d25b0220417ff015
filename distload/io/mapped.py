"""Zero-copy materialization on the CPU: a rank's tensors as copy-on-write views of the
checkpoint's pages. Each file is mapped private (`torch.UntypedStorage.from_file(...,
shared=False)`: address space only) and just this rank's byte ranges are faulted in at
once with `MADV_POPULATE_READ`, so the load still reads every byte of its tensors (from
disk when the cache is cold) and nothing is deferred to the first forward.

No copy and no fresh anonymous memory: on a small VM, first-touching fresh pages (4 KiB
page faults + zeroing) costs ~0.3-0.5 s per GB, more than reading from the page cache.
Writing to a weight copies just that page (private); the file is never written.

A run of adjacent tensors is faulted in by chunks of at most 64 MiB, each a ``read`` span
of `distload.trace` and a call of `progress(file, nbytes)` (see `distload.io.reader`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import defaultdict
from collections.abc import Sequence

import torch

from .. import trace
from ..checkpoint.types import TensorMeta
from ..errors import CheckpointError
from .stats import ReadProgress, ReadStats

__all__ = ["map_tensors"]

_MADV_POPULATE_READ = 22  # Linux >= 5.14
_PAGE = mmap.PAGESIZE
_CHUNK = 64 << 20  # bytes faulted in per madvise: progress is never further behind
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def map_tensors(reads: Sequence[TensorMeta], *, progress: ReadProgress | None = None
                ) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Map every tensor of `reads` whose offset suits its dtype; returns name -> tensor
    (the others are left to `read_tensors`) and what was read. Returns nothing mapped
    where the kernel lacks MADV_POPULATE_READ (the caller then reads as usual)."""
    stats = ReadStats()
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[TensorMeta]] = defaultdict(list)
    for m in reads:
        if m.length and m.offset % m.torch_dtype.itemsize == 0:
            by_file[m.file].append(m)
    for file, metas in sorted(by_file.items()):
        metas.sort(key=lambda m: m.offset)
        size = os.path.getsize(file)
        if metas[-1].offset + metas[-1].length > size:  # touching past EOF would SIGBUS
            raise CheckpointError(f"{file} is {size} bytes but tensor {metas[-1].name} ends at byte "
                                  f"{metas[-1].offset + metas[-1].length}: the file was truncated")
        base = torch.empty(0, dtype=torch.uint8)
        base.set_(torch.UntypedStorage.from_file(file, False, size))  # MAP_PRIVATE, nothing read yet
        if progress is not None:
            progress(file, 0)
        for run in _runs(metas):
            start, end = run[0].offset, run[-1].offset + run[-1].length
            for first in range(start, end, _CHUNK):
                n = min(_CHUNK, end - first)
                with trace.span("read", "io", file=file, offset=first, bytes=n, mapped=True):
                    if not _populate(base.data_ptr() + first, n):
                        return {}, ReadStats()
                stats.bytes_read += n
                stats.syscalls += 1
                if progress is not None:
                    progress(file, n)
            for m in run:
                out[m.name] = base[m.offset:m.offset + m.length].view(m.torch_dtype).view(m.shape)
    return out, stats


def _runs(metas: list[TensorMeta]):
    run = [metas[0]]
    for m in metas[1:]:
        if m.offset == run[-1].offset + run[-1].length:
            run.append(m)
        else:
            yield run
            run = [m]
    yield run


def _populate(addr: int, length: int) -> bool:
    """Fault in [addr, addr + length) (page-aligned outward); False if unsupported."""
    first = addr // _PAGE * _PAGE
    if _libc.madvise(first, addr + length - first, _MADV_POPULATE_READ) == 0:
        return True
    err = ctypes.get_errno()
    if err == 22:  # EINVAL: kernel < 5.14
        return False
    raise OSError(err, f"madvise(MADV_POPULATE_READ): {os.strerror(err)}")
