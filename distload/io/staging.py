"""The staging ring of one reader thread, and the copies out of it.

A reader thread preads a segment into a buffer of its ring and hands the segment's
pieces to the copier of their device:

* CUDA destinations (`CudaCopier`): the ring holds `BUFFERS` pinned buffers. The raw
  bytes go to the device asynchronously on the thread's own stream, a cast runs there
  after the copy (on the device, never on the CPU), and a CUDA event marks the buffer
  free again: the thread preads the next segment into the other buffer while the copy
  runs, and waits on a buffer's event only before reusing it.
* CPU destinations (`HostCopier`): one buffer, copied out at once (converting on the
  CPU, their device, when a cast is asked); reads and copies overlap across threads.

Memory is bounded: at most ``threads * buffers * (chunk + 3 * BLOCK)`` bytes of staging
(``staging_bytes`` of `read_tensors` per buffer) for a call, whatever the checkpoint; `StagingAccount` counts what was
allocated (buffers are made on first use, so a one-segment read allocates one).

Example::

    ring = StagingRing(chunk + 2 * BLOCK, BUFFERS, pin=True, account=StagingAccount())
    k = ring.acquire()                          # waits for buffer k's last copies
    data = handle.read_segment(ring.buffer(k), seg, stats)
    ring.release(k, copier.copy([(dest, piece, data[a:b], src_dtype), ...]))
    ring.close()                                # waits for every copy, frees the buffers
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch

from .direct import aligned_buffer
from .segments import Piece

__all__ = ["BUFFERS", "StagingAccount", "StagingRing", "HostCopier", "CudaCopier", "copier_for"]

BUFFERS = 2   # pinned, per thread: one filling by pread while the other's H2D copy runs


class StagingAccount:
    """Staging bytes allocated by every ring of one `read_tensors` call: now, at peak,
    and how many buffers were made (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.buffers = 0

    def allocated(self, nbytes: int) -> None:
        with self._lock:
            self.current += nbytes
            self.buffers += 1
            self.peak = max(self.peak, self.current)

    def freed(self, nbytes: int) -> None:
        with self._lock:
            self.current -= nbytes


class StagingRing:
    """`count` reusable, `BLOCK`-aligned buffers of `size` bytes, used in turn (pinned
    when `pin`). Owned by one thread."""

    def __init__(self, size: int, count: int, *, pin: bool, account: StagingAccount):
        if count < 1:
            raise ValueError(f"a staging ring needs at least one buffer, got {count}")
        self.size, self.pin, self._account = size, pin, account
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * count
        self._pending: list[Sequence] = [()] * count
        self._turn = 0

    def acquire(self) -> int:
        """The next buffer's index, once the copies out of its last use are done."""
        k = self._turn % len(self._buffers)
        self._turn += 1
        self._wait(k)
        if self._buffers[k] is None:
            self._buffers[k] = _allocate(self.size, self.pin)
            self._account.allocated(self._buffers[k][1].numel())
        return k

    def buffer(self, k: int) -> torch.Tensor:
        return self._buffers[k][0]

    def release(self, k: int, events: Sequence) -> None:
        """Buffer `k` may be reused once every one of `events` (CUDA events; empty when
        the copies are done already) has completed."""
        self._pending[k] = tuple(events)

    def _wait(self, k: int) -> None:
        events, self._pending[k] = self._pending[k], ()
        error = None
        for event in events:
            try:
                event.synchronize()
            except Exception as exc:  # noqa: BLE001 - wait on every copy before reuse
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for every copy out of the ring, then free its buffers; re-raises the
        first copy that failed."""
        error = None
        for k in range(len(self._buffers)):
            try:
                self._wait(k)
            except Exception as exc:  # noqa: BLE001 - the others must still be waited on
                error = error or exc
        for k, held in enumerate(self._buffers):
            if held is not None:
                self._account.freed(held[1].numel())
                self._buffers[k] = None
        if error is not None:
            raise error


def _allocate(size: int, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(aligned view, allocation): the one place staging memory is made (tests count it)."""
    return aligned_buffer(size, pin=pin)


Copy = tuple[torch.Tensor, Piece, torch.Tensor, torch.dtype]   # (dest, piece, src bytes, src dtype)


def _flat(dest: torch.Tensor) -> torch.Tensor:
    return dest.view(-1)


class HostCopier:
    """Copies into CPU destinations, at once, on the reader's own thread (a cast
    converts on the CPU, their device). Synchronous on purpose: a helper thread per
    reader would overlap the copy with the next read as a copy engine does, but every
    hand-off waits for a CPU, which on a loaded host costs more than it hides; several
    reader threads overlap reads and copies instead."""

    def copy(self, copies: Sequence[Copy]) -> list:
        _host_copies(copies)
        return []

    def close(self) -> None:
        pass


def _host_copies(copies: Sequence[Copy]) -> None:
    for dest, piece, src, src_dtype in copies:
        if dest.dtype == src_dtype:  # glibc's memmove (the GIL released): faster than copy_
            ctypes.memmove(dest.data_ptr() + piece.skip, src.data_ptr(), piece.length)
            continue
        if src.storage_offset() % piece.itemsize:  # the tensor is misaligned in its file
            src = src.clone()
        first = piece.skip // piece.itemsize
        _flat(dest)[first:first + piece.length // piece.itemsize].copy_(src.view(src_dtype))


class CudaCopier:
    """Copies into destinations on one CUDA device, on this thread's own stream: raw
    bytes host-to-device from pinned memory (asynchronous), then the cast on the device
    where one is asked. `copy` returns the event that marks them done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # Whatever the caller queued on the destinations before (a fill) comes first. Made
        # on a reader thread: `run_workers` makes the caller's stream that thread's current
        # one, since a new thread's current stream is the device's default stream.
        self.stream.wait_stream(torch.cuda.current_stream(device))

    def copy(self, copies: Sequence[Copy]) -> list:
        with torch.cuda.stream(self.stream):
            for dest, piece, src, src_dtype in copies:
                if dest.dtype == src_dtype:
                    out = _flat(dest).view(torch.uint8)[piece.skip:piece.skip + piece.length]
                    out.copy_(src, non_blocking=True)
                    continue
                # Allocated on this stream: the caching allocator reuses it only after
                # this stream's cast has run.
                raw = torch.empty(piece.length, dtype=torch.uint8, device=self.device)
                raw.copy_(src, non_blocking=True)
                first = piece.skip // piece.itemsize
                _flat(dest)[first:first + piece.length // piece.itemsize].copy_(raw.view(src_dtype))
            # Blocking: the ring's `synchronize` before reusing the buffer then sleeps in
            # the driver; a spinning event would burn a core per waiting reader thread.
            event = torch.cuda.Event(blocking=True)
            event.record(self.stream)  # after the copies out of the buffer: marks it free
        return [event]

    def close(self) -> None:
        pass


def copier_for(device: torch.device) -> HostCopier | CudaCopier:
    return CudaCopier(device) if device.type == "cuda" else HostCopier()
