"""Opening a checkpoint file for the reader's threads, with or without O_DIRECT, and
reading a segment's bytes into an aligned staging buffer.

O_DIRECT skips the page cache (no second copy, no cache to evict on a cold load) but asks
for block-aligned offsets, lengths and buffer addresses. A segment [start, end) is then
read as its aligned superset [align_down(start), align_up(end)) and the bytes before
`start` and after `end` are ignored; the buffer holds file byte X at offset
``X - align_down(start)`` in either mode, so a tensor's alignment in the buffer is its
alignment in the file. A filesystem that refuses O_DIRECT (EINVAL when it is switched
on, or at the first read) is read through the page cache instead, with one log line per
call of `read_tensors`.

Example::

    handle = FileHandle.open(path, "needed for model.embed_tokens.weight", direct=True)
    data = handle.read_segment(buffer, segment, stats)   # a uint8 view of [start, end)
    handle.close()
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import torch

from ..checkpoint.files import byte_view, open_checkpoint_file
from ..errors import CheckpointError
from ..log import logger
from .segments import BLOCK, Segment, align_down, align_up

__all__ = ["FileHandle", "Fallbacks", "aligned_buffer"]


def aligned_buffer(nbytes: int, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 CPU tensor of `nbytes` whose address is a multiple of `BLOCK`, and the
    allocation that holds it (keep that alive; it is `BLOCK` bytes larger)."""
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % BLOCK
    return raw[skip:skip + nbytes], raw


class Fallbacks:
    """The files of one `read_tensors` call whose filesystem refused O_DIRECT; the first
    is logged (one line), the others only counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.files: list[str] = []

    def note(self, file: str, err: OSError) -> None:
        with self._lock:
            self.files.append(file)
            first = len(self.files) == 1
        if first:
            logger.info("O_DIRECT refused for %s (%s): reading through the page cache instead",
                        file, err.strerror or err)


class FileHandle:
    """One open checkpoint file, shared by the threads that read its segments (`preadv`
    takes the offset, so they need no lock)."""

    def __init__(self, path: str, fd: int, size: int, direct: bool, fallbacks: Fallbacks | None):
        self.path, self.fd, self.size, self.direct = path, fd, size, direct
        self._fallbacks = fallbacks
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, purpose: str, *, direct: bool = False,
             fallbacks: Fallbacks | None = None) -> "FileHandle":
        """Open `path` (a regular file; `CheckpointError` naming `purpose` otherwise),
        switching O_DIRECT on when asked and the filesystem allows it."""
        fd, size = open_checkpoint_file(path, purpose)
        handle = cls(path, fd, size, False, fallbacks)
        if direct:
            try:
                _set_direct(fd, True)
                handle.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    os.close(fd)
                    raise CheckpointError(f"cannot read {path} with O_DIRECT ({purpose}): {e.strerror}") from e
                handle._refused(e)
        return handle

    def close(self) -> None:
        os.close(self.fd)

    def _refused(self, err: OSError) -> None:
        if self._fallbacks is not None:
            self._fallbacks.note(self.path, err)

    def _give_up_direct(self, err: OSError) -> None:
        """The filesystem took the flag but refuses direct reads: go through the cache."""
        with self._lock:
            if self.direct:
                _set_direct(self.fd, False)   # first: a thread that sees direct False must
                self.direct = False           # find the descriptor buffered already
                self._refused(err)

    def read_segment(self, buffer: torch.Tensor, seg: Segment, stats) -> torch.Tensor:
        """Read `seg` into the aligned uint8 `buffer` (at least ``seg.length + 2 * BLOCK``
        bytes) and return the view of its bytes [start, end). Counts into `stats`
        (`io_bytes`, `syscalls`). A short read before `end` is a truncated file."""
        base = align_down(seg.start)
        head = seg.start - base
        while True:
            direct = self.direct
            first, last = (base, align_up(seg.end)) if direct else (seg.start, seg.end)
            try:
                self._preadv_until([byte_view(buffer[first - base:last - base])], first, seg.end - first, seg, stats)
                break
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise CheckpointError(f"cannot read {self.path} at byte {first}: {e.strerror}") from e
                self._give_up_direct(e)
        return buffer[head:head + seg.length]

    def read_into(self, views: list[memoryview], seg: Segment, stats) -> None:
        """`seg` straight into `views` (its pieces' destination bytes, in order; through
        the page cache): one `preadv`, repeated until all are full."""
        self._preadv_until(views, seg.start, seg.length, seg, stats)

    def _preadv_until(self, views: list[memoryview], offset: int, need: int, seg: Segment, stats) -> None:
        """`preadv` into `views` from `offset` until `need` bytes are in (with O_DIRECT
        the aligned tail past the end of the file may stay unread). Zero bytes before
        that: the file is truncated."""
        views, done = list(views), 0
        while done < need:
            n = os.preadv(self.fd, views, offset + done)
            stats.syscalls += 1
            stats.io_bytes += n
            if n == 0:
                names = ", ".join(p.name for p in seg.pieces[:3])
                raise CheckpointError(f"unexpected end of {self.path} at byte {offset + done} while "
                                      f"reading {names}: the file is truncated")
            done += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


def _set_direct(fd: int, on: bool) -> None:
    """Switch O_DIRECT on or off for `fd` (Linux lets F_SETFL change it; a filesystem
    without direct I/O answers EINVAL)."""
    bit = getattr(os, "O_DIRECT", 0)
    if not bit:  # not Linux: no direct I/O at all
        raise OSError(errno.EINVAL, "O_DIRECT is not available on this system")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    flags = flags | bit if on else flags & ~bit
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
