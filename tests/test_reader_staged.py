"""The reader's staged path on the CPU (the GPU path minus the device copy), its threads,
chunks, O_DIRECT and fallbacks, and its bounded staging memory. Every tensor is checked
bit for bit against safetensors' own reader.

The checkpoint files are written by hand so that tensors sit at offsets no writer would
choose: an odd header length, odd-sized uint8 and bool tensors before wider ones, so
most tensors are misaligned for their dtype and for O_DIRECT's 4 KiB blocks, and large
ones span many chunks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from distload.checkpoint.safetensors_header import read_safetensors_header
from distload.errors import CheckpointError
from distload.io import read_tensors
from distload.io import direct as direct_mod
from distload.io import staging as staging_mod
from distload.io.pagecache import evict, resident_fraction
from distload.io.segments import BLOCK, plan_segments

from .odd_files import assert_equal, make_dests, odd_checkpoint, odd_tensors, write_odd_safetensors


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    """Two hand-written files on the test's filesystem (ext4 here), their metas, and
    safetensors' tensors."""
    return odd_checkpoint(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("staging", [64 << 10, (68 << 10) + 123, 1 << 20])
@pytest.mark.parametrize("direct_io", [False, True])
def test_staged_bit_exact(odd_ckpt, workers, staging, direct_io):
    files, metas, reference = odd_ckpt
    dests = make_dests(metas)
    stats = read_tensors(metas, dests, workers=workers, staging_bytes=staging, staged=True, direct_io=direct_io)
    assert_equal(dests, reference)
    assert stats.bytes_read == sum(m.length for m in metas)
    assert stats.io_bytes >= stats.bytes_read
    if not direct_io:
        assert stats.io_bytes == stats.bytes_read   # through the cache: exactly the tensors' bytes
    assert stats.direct_files + stats.refused_files == (len(files) if direct_io else 0)


@pytest.mark.parametrize("workers", [1, 4])
def test_unstaged_and_cast_bit_exact(odd_ckpt, workers):
    """Straight into CPU destinations (chunked, several threads), and with a cast."""
    _, metas, reference = odd_ckpt
    dests = make_dests(metas)
    stats = read_tensors(metas, dests, workers=workers, staging_bytes=64 << 10)
    assert_equal(dests, reference)
    assert stats.staging_bytes == 0
    for cast in (torch.float32, torch.float16, torch.bfloat16):
        for staged in (False, True):
            dests = make_dests(metas, cast)
            read_tensors(metas, dests, workers=workers, staging_bytes=64 << 10, staged=staged)
            assert_equal(dests, reference, cast)


def test_noncontiguous_destination_and_wrong_shape(odd_ckpt):
    _, metas, reference = odd_ckpt
    meta = next(m for m in metas if m.name == "0.h.f32")
    dest = torch.empty(meta.shape[::-1]).t()
    assert not dest.is_contiguous()
    read_tensors([meta], {meta.name: dest}, staged=True, staging_bytes=64 << 10, workers=2)
    assert torch.equal(dest, reference[meta.name])
    with pytest.raises(ValueError, match="h.f32 has shape"):
        read_tensors([meta], {meta.name: torch.empty(10)}, staged=True)


def _count_allocations(monkeypatch):
    made: list[int] = []
    real = staging_mod._allocate

    def counting(size, pin):
        made.append(size)
        return real(size, False)   # no CUDA here: the pinned ring's buffers are plain

    monkeypatch.setattr(staging_mod, "_allocate", counting)
    return made


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_staging_memory_is_bounded(odd_ckpt, monkeypatch, workers):
    _, metas, reference = odd_ckpt
    made = _count_allocations(monkeypatch)
    staging = 64 << 10
    dests = make_dests(metas)
    stats = read_tensors(metas, dests, workers=workers, staging_bytes=staging, staged=True, direct_io=True)
    assert_equal(dests, reference)
    # the CPU ring has one buffer per thread, of the staging size (with its alignment slack)
    assert 1 <= len(made) <= workers and set(made) == {staging - BLOCK}
    assert 0 < stats.staging_bytes <= workers * staging
    made.clear()
    read_tensors(metas, make_dests(metas), workers=workers, staging_bytes=staging)
    assert made == []   # nothing staged: CPU destinations, no cast, no O_DIRECT


class _Deferred:
    """A copier that runs its copies only when their event is synchronized (a copy
    engine far behind the reader): a buffer reused before its event would be overwritten
    before it was copied out, and the destination would be wrong."""

    log: list = []

    def __init__(self):
        self.outstanding = 0
        self.peak = 0

    def copy(self, copies):
        copier, batch = self, list(copies)
        self.outstanding += 1
        self.peak = max(self.peak, self.outstanding)
        _Deferred.log.append(("copy queued", batch[0][1].start))

        class Event:
            done = False

            def synchronize(self):
                if not self.done:
                    self.done = True
                    staging_mod._host_copies(batch)
                    copier.outstanding -= 1
                    _Deferred.log.append(("copy ran", batch[0][1].start))
        return [Event()]

    def close(self):
        pass


def test_pinned_ring_waits_for_copies_before_reuse(odd_ckpt, monkeypatch):
    """The CUDA ring's logic on the CPU: two buffers, copies deferred until their event
    is waited on. Every byte arrives intact, at most two segments' copies are in flight,
    and the reader preads the next segment before the previous copy ran (overlap)."""
    from distload.io import worker as worker_mod

    _, metas, reference = odd_ckpt
    made = _count_allocations(monkeypatch)
    copiers: list[_Deferred] = []
    monkeypatch.setattr(worker_mod, "copier_for", lambda device: copiers.append(_Deferred()) or copiers[-1])
    reads = []
    real_read = direct_mod.FileHandle.read_segment

    def logged_read(self, buffer, seg, stats):
        _Deferred.log.append(("read", seg.start))
        reads.append(seg.start)
        return real_read(self, buffer, seg, stats)

    monkeypatch.setattr(direct_mod.FileHandle, "read_segment", logged_read)
    # the reader pins (and doubles) its ring when a destination is on CUDA
    monkeypatch.setattr("distload.io.reader._pins", lambda dests: True, raising=True)
    _Deferred.log = []
    dests = make_dests(metas)
    read_tensors(metas, dests, workers=1, staging_bytes=64 << 10, staged=True)
    assert_equal(dests, reference)
    assert len(made) == staging_mod.BUFFERS == 2
    assert copiers and max(c.peak for c in copiers) == 2
    log = _Deferred.log
    first_run = log.index(next(e for e in log if e[0] == "copy ran"))
    assert sum(e[0] == "read" for e in log[:first_run]) == 2   # the next read before the last copy
    assert len(reads) > 4


def test_direct_io_skips_the_page_cache(tmp_path):
    """On a filesystem with O_DIRECT (ext4 here), a direct read leaves the file's pages
    out of the cache; a buffered read puts them in (so the check means something)."""
    path = tmp_path / "big.safetensors"
    tensors = {"x.f32": torch.randn(1 << 18), "y.u8": torch.randint(0, 256, (4097,), dtype=torch.uint8),
               "z.bf16": torch.randn(3, 1 << 17).to(torch.bfloat16)}
    write_odd_safetensors(path, tensors)
    metas = read_safetensors_header(path)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: nothing to show here")
    reference = safetensors_load(path.read_bytes())   # no mapping left behind to pin pages
    evict(path)
    assert resident_fraction(path) < 0.05
    dests = make_dests(metas)
    stats = read_tensors(metas, dests, workers=3, staging_bytes=64 << 10, direct_io=True)
    assert_equal(dests, reference)
    assert stats.direct_files == 1 and stats.refused_files == 0
    assert stats.io_bytes % BLOCK == 0 or stats.io_bytes > stats.bytes_read
    assert resident_fraction(path) < 0.05, "O_DIRECT reads went through the page cache"
    read_tensors(metas, make_dests(metas), workers=3, staging_bytes=64 << 10)
    assert resident_fraction(path) > 0.9


def _refuse_direct_switch(monkeypatch):
    def refuse(fd, on):
        if on:
            raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(direct_mod, "_set_direct", refuse)


def test_direct_io_refused_when_switched_on(odd_ckpt, monkeypatch, caplog):
    """A filesystem that refuses O_DIRECT (EINVAL from F_SETFL, as on tmpfs before Linux
    6.6 — tmpfs here accepts it, so the refusal is simulated): one log line, every file
    read through the page cache, bit-exact."""
    files, metas, reference = odd_ckpt
    _refuse_direct_switch(monkeypatch)
    dests = make_dests(metas)
    with caplog.at_level(logging.INFO, logger="distload"):
        stats = read_tensors(metas, dests, workers=2, staging_bytes=64 << 10, direct_io=True)
    assert_equal(dests, reference)
    assert stats.direct_files == 0 and stats.refused_files == len(files)
    lines = [r for r in caplog.records if "O_DIRECT refused" in r.getMessage()]
    assert len(lines) == 1 and "page cache" in lines[0].getMessage()


def test_direct_io_refused_at_the_first_read(odd_ckpt, monkeypatch, caplog):
    """A filesystem that takes the flag but fails direct reads with EINVAL: the reader
    switches the file to buffered reads and logs once."""
    files, metas, reference = odd_ckpt
    real = os.preadv

    def preadv(fd, buffers, offset, *a):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    dests = make_dests(metas)
    with caplog.at_level(logging.INFO, logger="distload"):
        stats = read_tensors(metas, dests, workers=3, staging_bytes=64 << 10, direct_io=True)
    assert_equal(dests, reference)
    assert stats.direct_files == 0 and stats.refused_files == len(files)
    assert sum("O_DIRECT refused" in r.getMessage() for r in caplog.records) == 1


def test_direct_io_on_tmpfs(odd_ckpt):
    """/dev/shm (tmpfs): O_DIRECT is taken (Linux >= 6.6) or refused; either way the
    bytes are right and the file is counted once."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/distload-test-{os.getpid()}.safetensors"
    try:
        write_odd_safetensors(path, odd_tensors(5))
        metas = read_safetensors_header(path)
        dests = make_dests(metas)
        stats = read_tensors(metas, dests, workers=2, staging_bytes=64 << 10, direct_io=True)
        assert_equal(dests, load_file(path))
        assert stats.direct_files + stats.refused_files == 1
    finally:
        os.unlink(path)


@pytest.mark.parametrize("direct_io", [False, True])
def test_truncated_file_is_named(tmp_path, direct_io):
    path = tmp_path / "t.safetensors"
    write_odd_safetensors(path, odd_tensors(3))
    metas = read_safetensors_header(path)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="t.safetensors.*truncated"):
        read_tensors(metas, make_dests(metas), workers=3, staging_bytes=64 << 10, staged=True, direct_io=direct_io)


def test_bad_arguments():
    with pytest.raises(ValueError, match="64 KiB"):
        read_tensors([], {}, staging_bytes=4096)
    with pytest.raises(ValueError, match="workers"):
        read_tensors([], {}, workers=0)


def test_an_error_in_one_thread_stops_the_others(odd_ckpt, monkeypatch):
    """A copy that fails on one thread is raised once the others stopped (after their
    current segment), with every ring closed: nothing hangs, no staging memory is left."""
    _, metas, _ = odd_ckpt
    real, calls = staging_mod._host_copies, []

    def failing(copies):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("copy failed on purpose")
        real(copies)

    accounts = []
    real_account = staging_mod.StagingAccount

    def account():
        accounts.append(real_account())
        return accounts[-1]

    monkeypatch.setattr(staging_mod, "_host_copies", failing)
    monkeypatch.setattr("distload.io.reader.StagingAccount", account)
    with pytest.raises(RuntimeError, match="on purpose"):
        read_tensors(metas, make_dests(metas), workers=3, staging_bytes=64 << 10, staged=True)
    segments = 0
    for file in {m.file for m in metas}:
        ms = sorted((m for m in metas if m.file == file and m.length), key=lambda m: m.offset)
        segments += len(plan_segments(ms, [True] * len(ms), chunk_bytes=(64 << 10) - 3 * BLOCK))
    assert len(calls) < segments              # the others stopped early
    assert accounts and accounts[0].current == 0 and accounts[0].peak > 0
