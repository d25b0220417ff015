"""`distload.io.segments.plan_segments` (pure): hand-built layouts with exact offsets, and
random ones (hypothesis) against the rules the reader relies on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distload.checkpoint.types import TensorMeta
from distload.io.segments import BLOCK, align_up, plan_segments

_DTYPES = {1: "uint8", 2: "bfloat16", 4: "float32", 8: "float64"}


def _metas(specs, start=0):
    """specs: (itemsize, numel, gap before) -> metas laid out from `start`."""
    out, pos = [], start
    for i, (item, numel, gap) in enumerate(specs):
        pos += gap
        out.append(TensorMeta(f"t{i}", "f", _DTYPES[item], (numel,), pos, item * numel))
        pos += item * numel
    return out


def test_coalesces_neighbours_and_splits_at_gaps_and_kinds():
    metas = _metas([(4, 10, 0), (4, 10, 0), (2, 5, 6), (2, 5, 0)], start=100)
    segs = plan_segments(metas, [True, True, True, False], chunk_bytes=2 * BLOCK)
    assert [(s.start, s.end, s.staged, [p.name for p in s.pieces]) for s in segs] == [
        (100, 180, True, ["t0", "t1"]), (186, 196, True, ["t2"]), (196, 206, False, ["t3"])]


def test_long_tensor_cut_on_blocks_and_elements():
    # a float32 tensor starting 2 bytes into a block: cuts at 8192, 16384, ... are 2 bytes
    # off its elements, so each moves down by 2
    metas = _metas([(4, 10000, 0)], start=4098)
    segs = plan_segments(metas, [True], chunk_bytes=2 * BLOCK)
    assert segs[0].start == 4098 and segs[-1].end == 4098 + 40000
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start and (a.end - 4098) % 4 == 0 and align_up(a.end) - a.end == 2
        assert b.pieces[0].skip == b.start - 4098
    assert all(s.length <= 2 * BLOCK for s in segs)


def test_direct_runs_hold_at_most_max_pieces():
    metas = _metas([(1, 3, 0)] * 10)
    segs = plan_segments(metas, [False] * 10, chunk_bytes=2 * BLOCK, max_pieces=4)
    assert [len(s.pieces) for s in segs] == [4, 4, 2]
    assert [s.start for s in segs] == [0, 12, 24]


def test_chunk_must_be_blocks():
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_segments([], [], chunk_bytes=BLOCK + 1)
    with pytest.raises(ValueError, match="at least 8192"):
        plan_segments([], [], chunk_bytes=BLOCK)


layouts = st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 5000), st.integers(0, 3)),
                   min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(layouts, st.integers(0, 9000), st.sampled_from([2, 3, 4]), st.data())
def test_segments_cover_every_byte_once(specs, start, blocks, data):
    metas = _metas(specs, start)
    staged = data.draw(st.lists(st.booleans(), min_size=len(metas), max_size=len(metas)))
    chunk = blocks * BLOCK
    segs = plan_segments(metas, staged, chunk_bytes=chunk, max_pieces=5)
    by_name = {m.name: m for m in metas}
    covered: dict[str, list[tuple[int, int]]] = {m.name: [] for m in metas}
    for s in segs:
        assert 0 < s.length <= chunk
        pos = s.start
        for p in s.pieces:            # pieces tile the segment, in order
            m = by_name[p.name]
            assert p.start == pos and p.start == m.offset + p.skip and p.length > 0
            assert p.skip % p.itemsize == 0 and p.length % p.itemsize == 0   # whole elements
            assert staged[metas.index(m)] == s.staged
            covered[p.name].append((p.skip, p.skip + p.length))
            pos += p.length
        assert pos == s.end
        if not s.staged:
            assert len(s.pieces) <= 5
    for m in metas:                    # each tensor's bytes exactly once, in order
        spans = covered[m.name]
        assert spans[0][0] == 0 and spans[-1][1] == m.length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # a cut inside a tensor lies on a block boundary, or less than one element below it
    for s in segs:
        inside = [m for m in metas if m.offset < s.end < m.offset + m.length]
        for m in inside:
            assert align_up(s.end) - s.end < m.torch_dtype.itemsize
