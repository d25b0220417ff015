"""Execute read items: read exactly the byte ranges of a rank's tensors into tensors
already allocated on its device.

Neighbouring tensors of one file are coalesced into one `preadv`. On the CPU, when no
cast is needed, bytes go straight into the destination tensors (no staging copy). With a
cast or a CUDA destination they pass through a small reusable staging buffer per worker
(pinned, with asynchronous host-to-device copies, on CUDA), so the extra memory is bounded
by `workers * staging_bytes` whatever the checkpoint size.

Progress: `read_tensors(..., progress=fn)` calls ``fn(file, nbytes)`` after each
coalesced read with the bytes it brought in (from the reader threads: `fn` must be
thread-safe and cheap). Each coalesced read is also a ``read`` span of `distload.trace`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import trace
from ..checkpoint.bin import load_bin_tensors
from ..checkpoint.files import byte_view, open_checkpoint_file
from ..checkpoint.types import TensorMeta
from ..errors import CheckpointError

__all__ = ["ReadStats", "ReadProgress", "read_tensors", "DEFAULT_STAGING_BYTES"]

DEFAULT_STAGING_BYTES = 32 << 20
_IOV_MAX = 1024  # Linux limit on buffers per preadv
# A direct run ends at this many bytes too, so that progress (and a stalled rank's last
# sign of life) is never more than one such read behind; a single larger tensor is one run.
_MAX_DIRECT_RUN = 64 << 20

ReadProgress = Callable[[str, int], None]
"""``progress(file, nbytes)``: `nbytes` more bytes of `file` were read."""


@dataclass
class ReadStats:
    bytes_read: int = 0      # bytes asked of the OS
    syscalls: int = 0
    seconds: float = 0.0

    def add(self, other: "ReadStats") -> None:
        self.bytes_read += other.bytes_read
        self.syscalls += other.syscalls


def read_tensors(
    reads: Sequence[TensorMeta],
    dests: Mapping[str, torch.Tensor],
    *,
    workers: int = 2,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    progress: ReadProgress | None = None,
) -> ReadStats:
    """Fill `dests[meta.name]` from `meta.file` (a path to open) for every meta in `reads`.

    Each destination must have the meta's shape; its dtype may differ (the bytes are cast
    by torch's `copy_`). Files are read in parallel by up to `workers` threads. Tensors of
    a pickled `.bin` file (offset -1) are taken from its memory map instead. Raises
    `CheckpointError` naming the file and tensor on a short read. `progress` (see the
    module doc) hears of every coalesced read.

    Example::

        dest = {m.name: torch.empty(m.shape, dtype=m.torch_dtype) for m in metas}
        stats = read_tensors(metas, dest)
    """
    start = time.perf_counter()
    by_file: dict[str, list[TensorMeta]] = defaultdict(list)
    pickled: dict[str, list[TensorMeta]] = defaultdict(list)
    for meta in reads:
        if meta.offset < 0:
            pickled[meta.file].append(meta)
        elif meta.length:
            by_file[meta.file].append(meta)
    total = ReadStats()
    for file, metas in sorted(pickled.items()):
        total.add(_copy_pickled(file, metas, dests, progress))
    local = threading.local()

    def run(file: str) -> ReadStats:
        if not hasattr(local, "stager"):
            local.stager = _Stager(staging_bytes)
        return _read_file(file, sorted(by_file[file], key=lambda m: m.offset), dests, local.stager,
                          progress)

    files = sorted(by_file)
    if workers <= 1 or len(files) <= 1:
        stager = _Stager(staging_bytes)
        results = [_read_file(f, sorted(by_file[f], key=lambda m: m.offset), dests, stager, progress)
                   for f in files]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(files)), thread_name_prefix="distload-read") as pool:
            results = list(pool.map(run, files))
    for r in results:
        total.add(r)
    if any(d.is_cuda for d in dests.values()):
        torch.cuda.synchronize()
    total.seconds = time.perf_counter() - start
    return total


def _copy_pickled(file: str, metas: list[TensorMeta], dests: Mapping[str, torch.Tensor],
                  progress: ReadProgress | None) -> ReadStats:
    """Tensors of a `.bin` file: its pages are mapped (`torch.load(mmap=True)`), so only
    the named tensors' pages are read, by the copy."""
    stats = ReadStats()
    for name, tensor in load_bin_tensors(file, [m.name for m in metas]).items():
        nbytes = tensor.numel() * tensor.element_size()
        with trace.span("read", "io", file=file, tensors=1, bytes=nbytes):
            dests[name].copy_(tensor)
        stats.bytes_read += nbytes
        if progress is not None:
            progress(file, nbytes)
    return stats


def _direct(meta: TensorMeta, dest: torch.Tensor) -> bool:
    return dest.device.type == "cpu" and dest.dtype == meta.torch_dtype and dest.is_contiguous()


def _runs(metas: list[TensorMeta], direct: list[bool], max_staged_bytes: int):
    """Group adjacent tensors (no gap, same path kind) into runs: direct runs up to
    `_IOV_MAX` buffers, staged runs up to the staging buffer's size."""
    run: list[TensorMeta] = []
    run_direct, run_bytes = False, 0
    for meta, is_direct in zip(metas, direct):
        adjacent = bool(run) and meta.offset == run[-1].offset + run[-1].length
        fits = (len(run) < _IOV_MAX and run_bytes + meta.length <= _MAX_DIRECT_RUN if is_direct
                else run_bytes + meta.length <= max_staged_bytes)
        if run and not (adjacent and is_direct == run_direct and fits):
            yield run_direct, run
            run, run_bytes = [], 0
        if not run:
            run_direct = is_direct
        run.append(meta)
        run_bytes += meta.length
    if run:
        yield run_direct, run


def _read_file(file: str, metas: list[TensorMeta], dests: Mapping[str, torch.Tensor], stager: "_Stager",
               progress: ReadProgress | None = None) -> ReadStats:
    stats = ReadStats()
    fd, size = open_checkpoint_file(file, f"needed for {metas[0].name}")
    try:
        last = metas[-1]
        if last.offset + last.length > size:
            raise CheckpointError(f"{file} is {size} bytes but tensor {last.name} ends at byte "
                                  f"{last.offset + last.length}: the file was truncated or changed")
        direct = [_direct(m, dests[m.name]) for m in metas]
        if progress is not None:
            progress(file, 0)   # this file is being read now (for a stalled rank's message)
        for is_direct, run in _runs(metas, direct, stager.capacity):
            nbytes = run[-1].offset + run[-1].length - run[0].offset
            with trace.span("read", "io", file=file, offset=run[0].offset, bytes=nbytes,
                            tensors=len(run)):
                if is_direct:
                    views = [byte_view(dests[m.name]) for m in run]
                    _preadv_exact(fd, views, run[0].offset, file, run, stats)
                else:
                    stager.copy_run(fd, file, run, dests, stats)
            if progress is not None:
                progress(file, nbytes)
        stager.drain()
    finally:
        os.close(fd)
    return stats


def _preadv_exact(fd: int, views: list[memoryview], offset: int, file: str,
                  run: Sequence[TensorMeta], stats: ReadStats) -> None:
    """preadv until every view is full; a short read (EOF) is a truncated file."""
    want = sum(len(v) for v in views)
    stats.bytes_read += want
    while views:
        n = os.preadv(fd, views, offset)
        stats.syscalls += 1
        if n == 0:
            raise CheckpointError(f"unexpected end of {file} at byte {offset} while reading "
                                  f"{', '.join(m.name for m in run[:3])}: the file is truncated")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class _Stager:
    """A reusable staging buffer for reads that need a cast or a device copy.

    On CUDA the buffer is pinned and doubled: while one half's host-to-device copy
    runs, the next pread fills the other half.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buffers: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0

    def _buffer(self, cuda: bool) -> tuple[torch.Tensor, object]:
        if not self._buffers:
            count = 2 if cuda else 1
            self._buffers = [torch.empty(self.capacity, dtype=torch.uint8, pin_memory=cuda) for _ in range(count)]
            self._events = [None] * count
        k = self._turn % len(self._buffers)
        self._turn += 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # its previous H2D copy must finish before reuse
            self._events[k] = None
        return self._buffers[k], k

    def copy_run(self, fd, file, run, dests, stats: ReadStats) -> None:
        cuda = dests[run[0].name].is_cuda
        if len(run) == 1 and run[0].length > self.capacity:
            self._copy_large(fd, file, run[0], dests[run[0].name], stats, cuda)
            return
        buf, k = self._buffer(cuda)
        length = sum(m.length for m in run)
        _preadv_exact(fd, [byte_view(buf[:length])], run[0].offset, file, run, stats)
        for m in run:
            start = m.offset - run[0].offset
            src = buf[start:start + m.length].view(m.torch_dtype).view(m.shape)
            dests[m.name].copy_(src, non_blocking=cuda)
        self._record(k, cuda)

    def _copy_large(self, fd, file, meta: TensorMeta, dest: torch.Tensor, stats, cuda: bool) -> None:
        item = meta.torch_dtype.itemsize
        chunk = max(item, self.capacity // item * item)
        flat = dest.view(-1)
        for begin in range(0, meta.length, chunk):
            n = min(chunk, meta.length - begin)
            buf, k = self._buffer(cuda)
            _preadv_exact(fd, [byte_view(buf[:n])], meta.offset + begin, file, [meta], stats)
            flat[begin // item:(begin + n) // item].copy_(buf[:n].view(meta.torch_dtype), non_blocking=cuda)
            self._record(k, cuda)

    def _record(self, k: int, cuda: bool) -> None:
        if cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[k] = event

    def drain(self) -> None:
        for e in self._events:
            if e is not None:
                e.synchronize()
        self._events = [None] * len(self._events)
