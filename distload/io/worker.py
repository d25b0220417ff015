"""One reader thread's work: take segments (`distload.io.segments`) and fill their
destinations, straight into them with one `preadv`, or through the thread's staging ring
(`distload.io.staging`) and a copy (to the device, with a cast there when asked).

Example::

    worker = SegmentWorker(dests, src_dtypes, handles, buffer_bytes=chunk + 2 * BLOCK,
                           pin=True, account=account)
    for seg in my_segments:
        worker.run(seg)
    worker.close()          # waits for its copies; worker.stats holds what it read

    # or: `threads` threads taking the segments in turn, one worker each
    parts = run_workers(segments, threads, make_worker=lambda: SegmentWorker(...))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import trace
from ..checkpoint.files import byte_view
from .direct import FileHandle
from .segments import Segment
from .staging import BUFFERS, StagingAccount, StagingRing, copier_for
from .stats import ReadProgress, ReadStats

__all__ = ["SegmentWorker", "run_workers"]


class SegmentWorker:
    """The state of one reader thread: its ring (made on its first staged segment:
    `BUFFERS` pinned buffers when `pin`, else one) and one copier per destination
    device. Not shared between
    threads."""

    def __init__(self, dests: Mapping[str, torch.Tensor], src_dtypes: Mapping[str, torch.dtype],
                 handles: Mapping[str, FileHandle], *, buffer_bytes: int, pin: bool,
                 account: StagingAccount, progress: ReadProgress | None = None):
        self._dests, self._dtypes, self._handles = dests, src_dtypes, handles
        self._progress, self._file = progress, None
        self._buffer_bytes, self._pin, self._account = buffer_bytes, pin, account
        self._ring: StagingRing | None = None
        self._copiers: dict = {}
        self.stats = ReadStats()

    def run(self, seg: Segment) -> None:
        """Read `seg` into its destinations; a ``read`` span of `distload.trace`, and
        ``progress(file, nbytes)`` after it (``progress(file, 0)`` first where this
        thread starts on another file)."""
        if self._progress is not None and seg.file != self._file:
            self._file = seg.file
            self._progress(seg.file, 0)
        with trace.span("read", "io", file=seg.file, offset=seg.start, bytes=seg.length,
                        staged=seg.staged):
            if seg.staged:
                self._staged(seg)
            else:
                self._direct(seg)
        self.stats.bytes_read += seg.length
        if self._progress is not None:
            self._progress(seg.file, seg.length)

    def _direct(self, seg: Segment) -> None:
        views = [byte_view(self._dests[p.name])[p.skip:p.skip + p.length] for p in seg.pieces]
        self._handles[seg.file].read_into(views, seg, self.stats)

    def _staged(self, seg: Segment) -> None:
        if self._ring is None:
            self._ring = StagingRing(self._buffer_bytes, BUFFERS if self._pin else 1,
                                     pin=self._pin, account=self._account)
        k = self._ring.acquire()
        data = self._handles[seg.file].read_segment(self._ring.buffer(k), seg, self.stats)
        by_device: dict[torch.device, list] = {}
        for p in seg.pieces:
            dest = self._dests[p.name]
            src = data[p.start - seg.start:p.start - seg.start + p.length]
            by_device.setdefault(dest.device, []).append((dest, p, src, self._dtypes[p.name]))
        events: list = []
        for device, copies in by_device.items():
            if device not in self._copiers:
                self._copiers[device] = copier_for(device)
            events += self._copiers[device].copy(copies)
        self._ring.release(k, events)

    def close(self) -> None:
        """Wait for this thread's copies to finish and free its ring."""
        try:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
        finally:
            for copier in self._copiers.values():
                copier.close()
            self._copiers.clear()


def run_workers(segments: Sequence[Segment], threads: int, *, make_worker: Callable[[], SegmentWorker],
                device: torch.device | None = None) -> list[ReadStats]:
    """Read `segments` on `threads` threads (the caller's own when 1), each with its own
    `make_worker()` and taking the next segment in order, so neighbouring chunks of a
    file are read at once. The first error stops the others (after their current
    segment) and is raised; every worker is closed. With `device` (a CUDA device) each
    thread works with it current: a new thread's is device 0, where pinning or copying
    would make a context (and take memory) on another rank's GPU; and the caller's current
    stream is the current one of every thread."""
    queue = iter(segments)
    lock, failed = threading.Lock(), threading.Event()

    def work() -> ReadStats:
        worker = make_worker()
        try:
            while not failed.is_set():
                with lock:
                    seg = next(queue, None)
                if seg is None:
                    break
                worker.run(seg)
        except BaseException:
            failed.set()
            raise
        finally:
            worker.close()
        return worker.stats

    # The caller's current stream, made current on every reader thread too: the copiers
    # order their copies after what the caller queued on it (a new thread's current
    # stream is the default stream, which the caller may not be using).
    caller = torch.cuda.current_stream(device) if device is not None else None

    def loop() -> ReadStats:
        if device is None:
            return work()
        # both restore the caller's when run on its thread
        with torch.cuda.device(device), torch.cuda.stream(caller):
            return work()

    if threads <= 1:
        return [loop()]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="distload-read") as pool:
        futures = [pool.submit(loop) for _ in range(threads)]
    return [f.result() for f in futures]   # the first failed thread's error, raised here
