"""A file's pages in the page cache: drop them (a cold read without root: no
``drop_caches``), and count those resident. Linux only. For benchmarks and tests of cold
loads and O_DIRECT; the reader does not use it.

Example::

    evict("model-00001-of-00002.safetensors")          # the next read comes from disk
    resident_fraction("model-00001-of-00002.safetensors")   # ~0.0 now
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["evict", "resident_fraction"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def evict(path: str | os.PathLike) -> None:
    """Write back `path`'s dirty pages, then ask the kernel to drop its cached pages
    (`posix_fadvise(POSIX_FADV_DONTNEED)`; pages mapped by a process may stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str | os.PathLike) -> float:
    """The fraction of `path`'s pages in the page cache now (`mincore` of a mapping that
    faults nothing in); 0.0 for an empty file."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in vec) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
