"""The offload directory: content addressing, zero-copy references, atomic writes, locks
across processes, corruption repair, and `python -m distload.offload`.

Reference tensors come from safetensors' own reader; concurrency uses separate processes
(subprocesses), never threads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distload.checkpoint import index_checkpoint
from distload.sources.demo import make_checkpoint
from distload.offload import (EntrySpec, OffloadError, OffloadStore, ensure_entries, gc_store,
                              list_entries, verify_store)

from .conftest import tiny_config
from .mp import worker

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """float32, 2 layers, 3 shards."""
    out = tmp_path_factory.mktemp("offload") / "ckpt"
    return make_checkpoint(tiny_config(num_hidden_layers=2), out, num_shards=3, dtype="float32", seed=3)


def _reference(meta, dtype=None) -> torch.Tensor:
    with safe_open(meta.file, "pt") as f:
        t = f.get_tensor(meta.name)
    return t if dtype is None else t.to(getattr(torch, dtype))


def _py(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, "worker never got ready"
        time.sleep(0.02)


def test_entries_are_bit_exact_copies_or_zero_copy_references(ckpt, tmp_path):
    index = index_checkpoint(ckpt)
    store = OffloadStore(tmp_path / "off")
    native, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt))
    cast, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    for name, meta in index.tensors.items():
        ref, copy = native[name], cast[name]
        assert ref.kind == "ref" and ref.path == os.path.realpath(meta.file) and ref.offset == meta.offset
        assert copy.kind == "copy" and ref.key != copy.key          # another dtype, another entry
        assert torch.equal(ref.read(), _reference(meta))
        assert torch.equal(copy.read(), _reference(meta, "bfloat16"))
        with safe_open(copy.path, "pt") as f:                       # an entry is a safetensors file
            assert torch.equal(f.get_tensor("tensor"), _reference(meta, "bfloat16"))
    # zero-copy entries hold a header only; copies hold the bytes
    rows = {r["key"]: r for r in list_entries(store)}
    assert all(rows[e.key]["disk_bytes"] < 1024 for e in native.values())
    assert all(rows[e.key]["disk_bytes"] >= e.nbytes for e in cast.values())
    assert all(str(ckpt.resolve()) in rows[e.key]["models"][0] for e in cast.values())


def test_key_covers_source_identity_dtype_and_shape(ckpt, tmp_path):
    meta = next(iter(index_checkpoint(ckpt).tensors.values()))
    spec = EntrySpec.from_meta(meta)
    assert spec.key == EntrySpec.from_meta(meta).key
    assert spec.key != EntrySpec.from_meta(meta, "float16").key
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(meta.file).read_bytes())
    moved = EntrySpec.from_meta(meta.__class__(**{**meta.__dict__, "file": str(copy)}))
    assert moved.key != spec.key                                    # another file
    os.utime(copy, ns=(1, 1))
    touched = EntrySpec.from_meta(meta.__class__(**{**meta.__dict__, "file": str(copy)}))
    assert touched.key != moved.key                                 # same file, changed mtime


def test_rerun_writes_zero_bytes(ckpt, tmp_path):
    index = index_checkpoint(ckpt)
    first = OffloadStore(tmp_path / "off")
    ensure_entries(first, index.tensors, checkpoint=str(ckpt), dtype="float16")
    assert first.entries_written == len(index.tensors) and first.bytes_written > index.tensor_bytes // 2
    manifest = tmp_path / "off" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    second = OffloadStore(tmp_path / "off")
    entries, read = ensure_entries(second, index.tensors, checkpoint=str(ckpt), dtype="float16")
    assert second.bytes_written == 0 and second.entries_written == 0 and read == 0
    assert manifest.stat().st_mtime_ns == stamp
    assert len(entries) == len(index.tensors)


@pytest.mark.parametrize("dtype", ["bfloat16", "none"])
def test_four_processes_populate_one_directory(ckpt, tmp_path, dtype):
    root, barrier = tmp_path / "off", tmp_path / "barrier"
    barrier.mkdir()
    procs = [_py(worker("offload_populate.py"), ckpt, root, dtype, barrier, 4, tmp_path / f"p{i}.json")
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(4)]
    n = len(index_checkpoint(ckpt).tensors)
    assert all(r["mismatches"] == [] and r["entries"] == n for r in results)
    assert sum(r["entries_written"] for r in results) == n          # each entry written once
    assert len(list_entries(OffloadStore(root))) == n
    assert verify_store(OffloadStore(root)) == []
    assert {k for r in results for k in r["kinds"]} == ({"ref"} if dtype == "none" else {"copy"})


def test_writer_killed_mid_write_leaves_nothing_visible(ckpt, tmp_path):
    root, ready = tmp_path / "off", tmp_path / "ready"
    proc = _py(worker("offload_writer.py"), ckpt, root, "bfloat16", ready, "write")
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    store = OffloadStore(root, timeout_s=5)       # its lock died with it: no waiting
    leftovers = list((root / "data").glob("*/.*.tmp.*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # bytes reached the disk ...
    assert list_entries(store) == []                               # ... but no entry is visible
    index = index_checkpoint(ckpt)
    entries, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    assert store.entries_written == len(index.tensors)
    assert all(torch.equal(e.read(), _reference(index.tensors[n], "bfloat16")) for n, e in entries.items())
    assert list((root / "data").glob("*/.*.tmp.*")) == []          # the next writer cleaned up
    assert verify_store(store) == []


def test_lock_waits_with_a_clear_timeout_and_dies_with_its_process(ckpt, tmp_path):
    root, ready = tmp_path / "off", tmp_path / "ready"
    proc = _py(worker("offload_writer.py"), ckpt, root, "bfloat16", ready, "hold")
    _wait_for(ready, proc)
    index = index_checkpoint(ckpt)
    meta = min(index.tensors.values(), key=lambda m: EntrySpec.from_meta(m, "bfloat16").key)
    store = OffloadStore(root, timeout_s=0.5)
    try:
        with pytest.raises(OffloadError, match=r"waited 0.5 s for .*\.lock to write offload entry"):
            ensure_entries(store, {meta.name: meta}, checkpoint=str(ckpt), dtype="bfloat16")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    entries, _ = ensure_entries(store, {meta.name: meta}, checkpoint=str(ckpt), dtype="bfloat16")
    assert torch.equal(entries[meta.name].read(), _reference(meta, "bfloat16"))


def test_flipped_byte_and_truncation_are_detected_and_repaired(ckpt, tmp_path, caplog):
    index = index_checkpoint(ckpt)
    name, meta = max(index.tensors.items(), key=lambda kv: kv[1].length)
    store = OffloadStore(tmp_path / "off")
    entry = ensure_entries(store, {name: meta}, checkpoint=str(ckpt), dtype="bfloat16")[0][name]
    with open(entry.path, "r+b") as f:                  # flip one bit of the tensor's bytes
        f.seek(entry.offset + entry.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    problems = verify_store(store)
    assert len(problems) == 1 and "checksum" in problems[0][2]
    again = OffloadStore(tmp_path / "off")
    with caplog.at_level(logging.WARNING, logger="distload"):
        fixed = ensure_entries(again, {name: meta}, checkpoint=str(ckpt), dtype="bfloat16")[0][name]
    assert "is corrupt (checksum" in caplog.text and again.repaired == 1
    assert torch.equal(fixed.read(), _reference(meta, "bfloat16")) and verify_store(again) == []
    os.truncate(fixed.path, fixed.offset + 10)          # and a truncated entry
    assert "size" in verify_store(again)[0][2]
    assert again.lookup(fixed.key) is None
    fixed = ensure_entries(again, {name: meta}, checkpoint=str(ckpt), dtype="bfloat16")[0][name]
    assert torch.equal(fixed.read(), _reference(meta, "bfloat16")) and again.repaired == 2


def test_gc_removes_what_no_model_needs(ckpt, tmp_path):
    index = index_checkpoint(ckpt)
    store = OffloadStore(tmp_path / "off")
    kept, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    meta = next(iter(index.tensors.values()))
    orphan = store.ensure(EntrySpec.from_meta(meta, "float16"), lambda: _reference(meta))  # unlisted
    (store.entry_file(orphan.key).parent / f".{orphan.key}.tmp.1.dead").write_bytes(b"x")
    # a second checkpoint whose file then changes: its entries can never be asked for again
    other = tmp_path / "other"
    make_checkpoint(tiny_config(num_hidden_layers=1), other, num_shards=1, dtype="float32")
    ensure_entries(store, index_checkpoint(other).tensors, checkpoint=str(other))
    for f in other.glob("*.safetensors"):
        os.utime(f, ns=(1, 1))
    dry = gc_store(store, dry_run=True)
    assert dry.entries == 1 + len(index_checkpoint(other).tensors) and store.lookup(orphan.key)
    res = gc_store(store)
    assert (res.entries, res.temporaries, len(res.models)) == (dry.entries, 1, 1)
    assert store.lookup(orphan.key) is None and res.kept == len(kept)
    assert {r["key"] for r in list_entries(store)} == {e.key for e in kept.values()}
    assert verify_store(store) == []


def test_cli_ls_verify_gc(ckpt, tmp_path, capsys):
    from distload.offload.__main__ import main

    index = index_checkpoint(ckpt)
    store = OffloadStore(tmp_path / "off")
    entries, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    root = str(tmp_path / "off")
    ls = subprocess.run([sys.executable, "-m", "distload.offload", "ls", root],   # the real entry point
                        capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0 and f"{len(entries)} entries" in ls.stdout
    assert "model.layers.1.mlp.up_proj.weight" in ls.stdout and str(ckpt.resolve()) in ls.stdout
    assert main(["verify", root]) == 0
    entry = next(iter(entries.values()))
    with open(entry.path, "r+b") as f:
        f.seek(entry.offset)
        f.write(b"\xff\xff")
    capsys.readouterr()
    assert main(["verify", root]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "checksum" in out
    assert main(["gc", root]) == 0 and "removed 0 entries" in capsys.readouterr().out
    for bad_dir, message in ((tmp_path / "nope", "is not a directory"), (ckpt, "not an offload directory")):
        with pytest.raises(SystemExit) as exit_:
            main(["ls", str(bad_dir)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (ckpt / "data").exists()


# ---------------------------------------------------------------- a node-local directory


def test_filesystem_type_from_mounts(tmp_path):
    from distload.offload.fs import filesystem_type, is_network_filesystem

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n"
                      "server:/export /shared nfs4 rw 0 0\n"
                      "lustre@tcp:/fs /shared/lus lustre rw 0 0\n"
                      "sshfs#me@host: /mnt/my\\040dir fuse.sshfs rw 0 0\n")
    kind = lambda p: filesystem_type(p, mounts=str(mounts))  # noqa: E731
    assert kind("/home/me/offload") == "ext4"
    assert kind("/shared/models/offload") == "nfs4" and kind("/shared") == "nfs4"
    assert kind("/shared/lus/x") == "lustre" and kind("/sharedother") == "ext4"
    assert kind("/mnt/my dir/off") == "fuse.sshfs"
    assert [is_network_filesystem(k) for k in ("ext4", "xfs", "tmpfs", "nfs4", "lustre", "gpfs", "cifs",
                                                 "fuse.sshfs", None)] == [False] * 3 + [True] * 5 + [False]
    assert filesystem_type(tmp_path, mounts=str(tmp_path / "none")) is None


def test_store_on_a_network_filesystem_warns_once(tmp_path, monkeypatch, caplog):
    import distload.offload.fs as fs

    monkeypatch.setattr(fs, "filesystem_type", lambda path: "nfs4")
    monkeypatch.setattr(fs, "_warned", set())
    with caplog.at_level("WARNING", logger="distload"):
        OffloadStore(tmp_path / "off")
        OffloadStore(tmp_path / "off")
    warnings = [r.getMessage() for r in caplog.records if "file locks may not hold" in r.getMessage()]
    assert len(warnings) == 1 and "nfs4" in warnings[0] and str(tmp_path / "off") in warnings[0]
    monkeypatch.setattr(fs, "filesystem_type", lambda path: "ext4")
    caplog.clear()
    with caplog.at_level("WARNING", logger="distload"):
        OffloadStore(tmp_path / "local")
    assert not caplog.records
