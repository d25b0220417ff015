"""What a read did: `ReadStats`, filled by `read_tensors` and `map_tensors`; and how a
read tells its caller as it goes: a `ReadProgress` callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ReadStats", "ReadProgress"]

ReadProgress = Callable[[str, int], None]
"""``progress(file, nbytes)``: `nbytes` more bytes of `file` were read (0: reading `file`
starts). Called from reader threads: it must be thread-safe and cheap."""


@dataclass
class ReadStats:
    """Figures of one read. `bytes_read` counts tensor bytes taken from the files (each
    once); `io_bytes` what the OS was asked for (with O_DIRECT it includes the blocks
    around each range that alignment makes it read); `staging_bytes` is the peak of
    staging memory allocated at once; `direct_files` the files read with O_DIRECT and
    `refused_files` those whose filesystem refused it (read through the page cache)."""

    bytes_read: int = 0
    syscalls: int = 0
    seconds: float = 0.0
    io_bytes: int = 0
    staging_bytes: int = 0
    threads: int = 0
    direct_files: int = 0
    refused_files: int = 0

    def add(self, other: "ReadStats") -> None:
        """Fold in the figures of a part of the same read (sums; peaks and counts of
        threads take the larger)."""
        self.bytes_read += other.bytes_read
        self.syscalls += other.syscalls
        self.io_bytes += other.io_bytes
        self.staging_bytes = max(self.staging_bytes, other.staging_bytes)
        self.threads = max(self.threads, other.threads)
        self.direct_files += other.direct_files
        self.refused_files += other.refused_files
