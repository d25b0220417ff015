"""Execute read items: read exactly the byte ranges of a rank's tensors into tensors
already allocated on its device.

Each file's tensors are planned into segments (`distload.io.segments`): neighbours
coalesced, long ranges cut into chunks that fill a staging buffer of `staging_bytes`
(less 12 KiB: a 4 KiB block either side for O_DIRECT's aligned reads, and one for the
buffer's own alignment), so that `workers` threads share every file, big or small. A
segment goes straight into its CPU destinations (one `preadv`, no staging copy) when no
cast is needed; with a cast, a CUDA destination, O_DIRECT or `staged=True` it passes
through its thread's staging ring (`distload.io.staging`: pinned and double-buffered with
asynchronous host-to-device copies on CUDA), so the extra memory is bounded by
``workers * buffers * staging_bytes`` (buffers: 2 on CUDA, else 1) whatever the
checkpoint size.

Progress: `read_tensors(..., progress=fn)` calls ``fn(file, nbytes)`` after each segment
with the bytes it brought in (see `distload.io.stats.ReadProgress`); each segment is also
a ``read`` span of `distload.trace`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from .. import trace
from ..checkpoint.bin import load_bin_tensors
from ..checkpoint.types import TensorMeta
from ..errors import CheckpointError
from .base import DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES
from .direct import Fallbacks, FileHandle
from .segments import BLOCK, Segment, align_down, plan_segments
from .staging import StagingAccount
from .stats import ReadProgress, ReadStats
from .worker import SegmentWorker, run_workers

__all__ = ["ReadStats", "ReadProgress", "read_tensors", "DEFAULT_STAGING_BYTES", "MIN_STAGING_BYTES"]


def read_tensors(
    reads: Sequence[TensorMeta],
    dests: Mapping[str, torch.Tensor],
    *,
    workers: int = 2,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    direct_io: bool = False,
    staged: bool = False,
    progress: ReadProgress | None = None,
) -> ReadStats:
    """Fill `dests[meta.name]` from `meta.file` (a path to open) for every meta in `reads`.

    Each destination must have the meta's shape; its dtype may differ (floating-point
    casts: on the destination's device, after the copy). `workers` threads read the
    segments of all files; each thread stages through buffers of `staging_bytes` (rounded
    down to 4 KiB, at least 64 KiB; a power of two suits the pinned-memory cache). `direct_io` reads with O_DIRECT where the filesystem allows it
    (through staging: aligned buffers; one log line and the page cache elsewhere).
    `staged` sends every byte through staging, as a CUDA destination does (benchmarks and
    tests of that path on the CPU). `progress` hears of every segment read (see the
    module doc). Tensors of a pickled `.bin` file (offset -1) are taken
    from its memory map instead. Raises `CheckpointError` naming the file and tensor on a
    short read.

    Example::

        dest = {m.name: torch.empty(m.shape, dtype=m.torch_dtype) for m in metas}
        stats = read_tensors(metas, dest, workers=4)
        stats.bytes_read, stats.staging_bytes
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    chunk = align_down(staging_bytes) - 3 * BLOCK
    if chunk + 3 * BLOCK < MIN_STAGING_BYTES:
        raise ValueError(f"staging_bytes must be at least {MIN_STAGING_BYTES} (64 KiB), got {staging_bytes}")
    start = time.perf_counter()
    by_file: dict[str, list[TensorMeta]] = defaultdict(list)
    total = ReadStats()
    pickled: dict[str, list[TensorMeta]] = defaultdict(list)
    for meta in reads:
        if meta.offset < 0:
            pickled[meta.file].append(meta)
        elif meta.length:
            dest = dests[meta.name]
            if tuple(dest.shape) != tuple(meta.shape):  # copies write raw bytes: never past the end
                raise ValueError(f"destination of {meta.name} has shape {tuple(dest.shape)}, "
                                 f"the checkpoint's is {tuple(meta.shape)}")
            by_file[meta.file].append(meta)
    for file, metas in sorted(pickled.items()):
        total.add(_copy_pickled(file, metas, dests, progress))
    # A destination that is not one contiguous block is read into a stand-in, copied after.
    targets = dict(dests)
    standins = {m.name: torch.empty(dests[m.name].shape, dtype=dests[m.name].dtype, device=dests[m.name].device)
                for ms in by_file.values() for m in ms if not dests[m.name].is_contiguous()}
    targets.update(standins)
    segments: list[Segment] = []
    for file in sorted(by_file):
        metas = sorted(by_file[file], key=lambda m: m.offset)
        flags = [staged or direct_io or _needs_staging(m, targets[m.name]) for m in metas]
        segments += plan_segments(metas, flags, chunk_bytes=chunk)
    if segments:
        total.add(_run(segments, by_file, targets, workers=workers, chunk=chunk, direct_io=direct_io,
                       progress=progress))
    for name, standin in standins.items():
        dests[name].copy_(standin)
    total.seconds = time.perf_counter() - start
    return total


def _needs_staging(meta: TensorMeta, dest: torch.Tensor) -> bool:
    return dest.device.type != "cpu" or dest.dtype != meta.torch_dtype


def _pins(dests: Sequence[torch.Tensor]) -> bool:
    """Pinned, doubled staging rings: when any destination is on a CUDA device."""
    return any(d.is_cuda for d in dests)


def _run(segments: list[Segment], by_file: Mapping[str, list[TensorMeta]], dests: Mapping[str, torch.Tensor],
         *, workers: int, chunk: int, direct_io: bool, progress: ReadProgress | None = None) -> ReadStats:
    """Open the files, read `segments` on up to `workers` threads (each taking the next
    segment in file order), close the files. The first error stops every thread."""
    src_dtypes = {m.name: m.torch_dtype for ms in by_file.values() for m in ms}
    pin = _pins([dests[n] for n in src_dtypes])
    device = next((dests[n].device for n in src_dtypes if dests[n].is_cuda), None)
    fallbacks, account = Fallbacks(), StagingAccount()
    handles: dict[str, FileHandle] = {}
    stats = ReadStats()
    try:
        for file, metas in sorted(by_file.items()):
            last = max(metas, key=lambda m: m.offset + m.length)
            handles[file] = handle = FileHandle.open(file, f"needed for {metas[0].name}", direct=direct_io,
                                                     fallbacks=fallbacks)
            if last.offset + last.length > handle.size:
                raise CheckpointError(f"{file} is {handle.size} bytes but tensor {last.name} ends at byte "
                                      f"{last.offset + last.length}: the file was truncated or changed")
        threads = min(workers, len(segments))
        parts = run_workers(segments, threads, device=device, make_worker=lambda: SegmentWorker(
            dests, src_dtypes, handles, buffer_bytes=chunk + 2 * BLOCK, pin=pin, account=account,
            progress=progress))
        for part in parts:
            stats.add(part)
        stats.threads = threads
        stats.direct_files = sum(h.direct for h in handles.values())
        stats.refused_files = len(set(fallbacks.files))
        stats.staging_bytes = account.peak
    finally:
        for handle in handles.values():
            handle.close()
    return stats


def _copy_pickled(file: str, metas: list[TensorMeta], dests: Mapping[str, torch.Tensor],
                  progress: ReadProgress | None = None) -> ReadStats:
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
