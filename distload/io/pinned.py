"""Page-locked host memory of an exact size, and one arena of it carved into views.

Why not `pin_memory=True` or `.pin_memory()`: PyTorch's caching host allocator rounds every
pinned allocation up to a power of two and keeps freed blocks cached for reuse. Pinned
tensor by tensor, an 86 MiB Llama-2-7B MLP weight takes 128 MiB, and a CPU tier the
planner filled to 90% of the host's RAM can ask for up to twice that: a failed pin or the
OOM killer. Here the pages are mapped anonymously and registered with CUDA
(`cudaHostRegister`), so the pinned bytes are the bytes asked for, rounded to a page; the
registration goes when the last view of the pages does.

A CUDA rank's CPU tier is one `HostArena` (`distload.loader.materialize`): its size is the
sum of the tier's tensors, each aligned to `ALIGN` bytes (`arena_layout`, pure), which is
what the rank report gives as ``pinned_bytes``.

Example::

    arena = HostArena({"w": 86 << 20, "b": 4096})      # one registration, ~86 MiB + 4 KiB
    w = arena.view("w", (11008, 4096), torch.bfloat16)  # pinned, a view of the arena
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping

import torch

from ..errors import LoadError
from ..log import logger
from .segments import align_up

__all__ = ["ALIGN", "arena_layout", "pin_host", "HostArena"]

ALIGN = 512         # bytes: each view's start (any dtype, and DMA-friendly)
_PAGE = mmap.PAGESIZE


def arena_layout(sizes: Mapping[str, int]) -> tuple[dict[str, int], int]:
    """(offset of each key, total bytes): the keys in sorted order, each at an `ALIGN`ed
    offset. Pure: the planner's and the report's figure, and the allocation's."""
    offsets, end = {}, 0
    for key in sorted(sizes):
        offsets[key] = end
        end += align_up(sizes[key], ALIGN)
    return offsets, end


class _LockedPages(mmap.mmap):
    """Anonymous pages, registered with CUDA while they live: unregistered before they
    are unmapped (a tensor made by `torch.frombuffer` keeps this object alive)."""

    registered = 0

    def __del__(self) -> None:
        if self.registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.registered)
            except Exception:  # noqa: BLE001 - at teardown, the driver may be gone already
                pass
            self.registered = 0


def _register(pages: _LockedPages, address: int, nbytes: int) -> None:
    """Page-lock `nbytes` at `address` for CUDA (the one place that calls the driver)."""
    rc = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
    if int(rc) != 0:
        raise LoadError(f"could not pin {nbytes} bytes of host memory for the CPU tier "
                        f"(cudaHostRegister error {int(rc)}); give the CPU tier less with "
                        f"--max-memory cpu=...")
    pages.registered = address


def _registers() -> bool:
    return hasattr(torch.cuda.cudart(), "cudaHostRegister")


def pin_host(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory as a uint8 tensor (pinned: copies from it to
    a CUDA device are asynchronous), taking `nbytes` rounded up to a page."""
    size = align_up(max(nbytes, 1), _PAGE)
    if not _registers():  # a build without it: the caching allocator, rounding and all
        logger.debug("pinning %d bytes through the caching host allocator", nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pages = _LockedPages(-1, size)
    buffer = torch.frombuffer(pages, dtype=torch.uint8)
    _register(pages, buffer.data_ptr(), size)
    return buffer[:nbytes]


class HostArena:
    """One pinned allocation holding the tensors `sizes` names (key -> bytes), each a
    view (`view`). The views keep the memory alive; so does the arena."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.offsets, self.nbytes = arena_layout(sizes)
        self._sizes = dict(sizes)
        self.buffer = pin_host(self.nbytes)

    def view(self, key: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """Key `key`'s tensor of `shape` and `dtype`, in its place in the arena."""
        start, nbytes = self.offsets[key], self._sizes[key]
        return self.buffer[start:start + nbytes].view(dtype).view(tuple(shape))
