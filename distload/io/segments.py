"""Planning one file's reads (pure: no I/O, no devices): which byte ranges to ask the OS
for, in what sizes, and which part of which destination tensor each range fills.

A `Segment` is one contiguous byte range of one file, read by one call of one thread:
neighbouring tensors (no gap between them, the same path) are coalesced into it, and a
range longer than `chunk_bytes` is cut, so that several threads can read one big file at
once and a staging buffer of `chunk_bytes` (plus a block either side) holds any segment.
Cuts fall on absolute multiples of `align` (the O_DIRECT block), moved down to the
element boundary of the tensor they cut, so that each `Piece` is whole elements (a cast
converts it alone) and the aligned supersets of neighbouring segments barely overlap.

Example::

    segments = plan_segments(sorted(metas, key=lambda m: m.offset), [True] * len(metas),
                             chunk_bytes=16 << 20)
    for seg in segments:
        seg.start, seg.end, [(p.name, p.skip, p.length) for p in seg.pieces]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..checkpoint.types import TensorMeta

__all__ = ["BLOCK", "IOV_MAX", "Piece", "Segment", "plan_segments", "align_down", "align_up"]

BLOCK = 4096     # O_DIRECT alignment of offsets, lengths and buffers (a multiple of any
                 # logical block size in use: 512 or 4096)
IOV_MAX = 1024   # Linux limit on buffers per preadv


def align_down(x: int, a: int = BLOCK) -> int:
    return x // a * a


def align_up(x: int, a: int = BLOCK) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class Piece:
    """`length` bytes of tensor `name`, at byte `start` of the file and byte `skip` of
    the tensor's own bytes (both whole elements of `itemsize`)."""

    name: str
    start: int
    length: int
    skip: int
    itemsize: int


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of `file`, filling `pieces` in order. `staged`: through a
    staging buffer (a cast, a device copy, O_DIRECT); else straight into the
    destinations (one `preadv`, at most `IOV_MAX` pieces)."""

    file: str
    start: int
    end: int
    staged: bool
    pieces: tuple[Piece, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_segments(metas: Sequence[TensorMeta], staged: Sequence[bool], *, chunk_bytes: int,
                  align: int = BLOCK, max_pieces: int = IOV_MAX) -> list[Segment]:
    """The segments that read `metas` (one file's tensors, sorted by offset, none empty);
    `staged[i]` says whether tensor i goes through staging. `chunk_bytes` (a multiple of
    `align`, at least 2 blocks) bounds every segment's length. Together the segments
    cover exactly the tensors' bytes, each once."""
    if chunk_bytes < 2 * align or chunk_bytes % align:
        raise ValueError(f"chunk_bytes {chunk_bytes} must be a multiple of {align} and at least {2 * align}")
    out: list[Segment] = []
    for is_staged, run in _runs(metas, staged):
        out.extend(_cut(run, is_staged, chunk_bytes, align, max_pieces))
    return out


def _runs(metas: Sequence[TensorMeta], staged: Sequence[bool]) -> Iterator[tuple[bool, list[TensorMeta]]]:
    """Maximal groups of adjacent tensors (each starts where the previous ends) of one kind."""
    run: list[TensorMeta] = []
    kind = False
    for meta, is_staged in zip(metas, staged):
        if run and not (meta.offset == run[-1].offset + run[-1].length and is_staged == kind):
            yield kind, run
            run = []
        if not run:
            kind = is_staged
        run.append(meta)
    if run:
        yield kind, run


def _cut(run: list[TensorMeta], staged: bool, chunk: int, align: int, max_pieces: int) -> Iterator[Segment]:
    file = run[0].file
    end_of_run = run[-1].offset + run[-1].length
    pos, i = run[0].offset, 0          # next byte to plan; first tensor not wholly planned
    while pos < end_of_run:
        cut = min(end_of_run, align_down(pos + chunk, align))
        pieces: list[Piece] = []
        while i < len(run) and run[i].offset < cut:
            m = run[i]
            m_end = m.offset + m.length
            item = m.torch_dtype.itemsize
            if m_end > cut:  # the cut falls inside m: move it down to an element boundary
                cut = m.offset + (cut - m.offset) // item * item
                if cut <= pos:  # cannot happen for chunk >= 2 blocks; guard the invariant
                    cut = min(m_end, pos + item)
            if not staged and len(pieces) == max_pieces:
                cut = pieces[-1].start + pieces[-1].length
                break
            start = max(m.offset, pos)
            stop = min(m_end, cut)
            if stop > start:
                pieces.append(Piece(m.name, start, stop - start, start - m.offset, item))
            if m_end <= cut:
                i += 1
            else:
                break
        yield Segment(file, pos, cut, staged, tuple(pieces))
        pos = cut
