"""Hostile and careless inputs, and faults, each ending in one clear error that names the
file or directory — and nothing corrupt left behind: a full disk mid-write, a SIGTERM
mid-write, files that are not files, symlinks out of the checkpoint, pickled payloads,
deeply nested JSON, an integer tensor where the model needs floats."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distload
import distload.offload.populate as populate
import distload.offload.store as store_mod
from distload.checkpoint import index_checkpoint, read_safetensors_header
from distload.errors import CheckpointError, LoadError
from distload.offload import OffloadError, OffloadStore, ensure_entries, pending_entries, verify_store
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import Ranks, worker


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "ckpt"
    return make_checkpoint(tiny_config(num_hidden_layers=2), out, num_shards=2, dtype="float32", seed=5)


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(ckpt, out)
    return out


# ----------------------------------------------------------------------------- offload faults

def test_a_full_disk_mid_write_names_the_directory_and_leaves_nothing_bad(ckpt, tmp_path, monkeypatch):
    index = index_checkpoint(ckpt)
    root = tmp_path / "off"
    real = store_mod._write_all

    def full_after_half(fd, view):
        if len(view) > 1024:                      # an entry's bytes (its header goes through)
            real(fd, view[:len(view) // 2])
            raise OSError(28, "No space left on device")
        real(fd, view)

    monkeypatch.setattr(store_mod, "_write_all", full_after_half)
    with pytest.raises(OffloadError) as ei:
        ensure_entries(OffloadStore(root), index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    assert str(root) in str(ei.value) and "No space left on device" in str(ei.value)
    assert not list(root.rglob("*.tmp.*"))                  # no temporary file left
    store = OffloadStore(root)
    assert verify_store(store) == [] and pending_entries(store)   # recorded, not written: no problem
    monkeypatch.setattr(store_mod, "_write_all", real)
    entries, _ = ensure_entries(store, index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    assert verify_store(store) == [] and pending_entries(store) == []
    meta = index.tensors["model.norm.weight"]
    from safetensors import safe_open
    with safe_open(meta.file, framework="pt") as f:
        assert torch.equal(entries[meta.name].read(), f.get_tensor(meta.name).to(torch.bfloat16))


def test_too_little_free_space_fails_before_writing(ckpt, tmp_path, monkeypatch):
    index = index_checkpoint(ckpt)
    root = tmp_path / "off"
    monkeypatch.setattr(populate.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OffloadError) as ei:
        ensure_entries(OffloadStore(root), index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    message = str(ei.value)
    assert str(root) in message and "GB more here" in message and "free" in message
    assert not list((root / "data").iterdir()) and not (root / "manifest.json").exists()


def test_offload_directories_are_not_writable_by_others(ckpt, tmp_path):
    old = os.umask(0)
    try:
        store = OffloadStore(tmp_path / "a" / "off")
        ensure_entries(store, index_checkpoint(ckpt).tensors, checkpoint=str(ckpt), dtype="bfloat16")
    finally:
        os.umask(old)
    for d in [store.root, store.root / "data", store.root / "locks", *(store.root / "data").iterdir()]:
        assert not os.stat(d).st_mode & (stat.S_IWGRP | stat.S_IWOTH), d


@pytest.mark.multiprocess
def test_sigterm_mid_offload_write_leaves_nothing_corrupt_and_the_rerun_completes(tmp_path):
    # 4 layers at 200 KB per rank: each stage streams its layers from the disk tier
    ckpt = make_checkpoint(tiny_config(num_hidden_layers=4), tmp_path / "ckpt", num_shards=3,
                           dtype="float32", seed=6)
    off = tmp_path / "off"
    argv = [worker("cli_slowed.py"), "--device", "cpu", "--model", str(ckpt), "--dtype", "bfloat16",
            "--max-seq-len", "16", "--max-memory", "0=200KB,1=200KB,cpu=0,disk=1GB",
            "--offload-dir", str(off), "--max-new-tokens", "2"]
    (tmp_path / "first").mkdir()
    job = Ranks([argv, argv], tmp_path / "first", env={"DISTLOAD_TEST_SLOW_WRITE": "3"})
    assert job.wait_for(0, "writing (slowed)", 60), job.stderr(0)[-2000:]
    job.signal_all(signal.SIGTERM)                        # Slurm at the time limit
    assert job.wait(30) == [143, 143]
    assert not list(off.rglob("*.tmp.*"))
    verify = [sys.executable, "-m", "distload.offload", "verify", str(off)]
    assert subprocess.run(verify, capture_output=True, text=True).returncode == 0
    (tmp_path / "second").mkdir()
    job = Ranks([argv, argv], tmp_path / "second")
    assert job.wait(90) == [0, 0], job.stderr(0)[-2000:]
    assert "disk" in job.stderr(0) and "offloaded" in job.stderr(0)
    done = subprocess.run(verify, capture_output=True, text=True)
    assert done.returncode == 0 and "0 problem(s)" in done.stdout and "not written" not in done.stdout


# ----------------------------------------------------------------------------- checkpoint files

def _weights(tmp_path: Path, name: str = "model.safetensors") -> Path:
    save_file({"a": torch.ones(4), "b": torch.zeros(2)}, str(tmp_path / name))
    return tmp_path / name


def test_bytes_after_the_last_tensor_are_refused_as_safetensors_does(tmp_path):
    file = _weights(tmp_path)
    with open(file, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model.safetensors: 8 byte\(s\) after the last tensor"):
        read_safetensors_header(file)
    from safetensors import safe_open
    with pytest.raises(Exception):                        # the reference refuses it too
        safe_open(str(file), framework="pt")


def test_a_shard_that_is_a_directory_fifo_or_outside_link_is_named(ckpt, tmp_path):
    for kind in ("directory", "fifo", "outside", "broken"):
        root = tmp_path / kind
        shutil.copytree(ckpt, root)
        shard = sorted(root.glob("*.safetensors"))[0]
        shard.unlink()
        if kind == "directory":
            shard.mkdir()
        elif kind == "fifo":
            os.mkfifo(shard)
        elif kind == "outside":
            (tmp_path / "elsewhere.safetensors").write_bytes((ckpt / shard.name).read_bytes())
            shard.symlink_to(tmp_path / "elsewhere.safetensors")
        else:
            shard.symlink_to(tmp_path / "gone.safetensors")
        with pytest.raises(CheckpointError) as ei:
            index_checkpoint(root)
        want = {"directory": "is a directory", "fifo": "is a FIFO", "outside": "outside the checkpoint",
                "broken": "broken symlink"}[kind]
        assert shard.name in str(ei.value) and want in str(ei.value), str(ei.value)


def test_hub_cache_symlinks_into_blobs_keep_working(ckpt, tmp_path):
    repo = tmp_path / "models--acme--tiny"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in ckpt.iterdir():
        blob = blobs / f"sha-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    assert set(index_checkpoint(snap).tensors) == set(index_checkpoint(ckpt).tensors)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors.index.json", "header"])
def test_deeply_nested_json_is_a_clear_error(ckpt, tmp_path, what):
    root = _copy(ckpt, tmp_path)
    deep = "[" * 50_000 + "]" * 50_000
    if what == "header":
        shard = sorted(root.glob("*.safetensors"))[0]
        blob = ('{"x": ' + deep + "}").encode()
        shard.write_bytes(len(blob).to_bytes(8, "little") + blob)
        target = shard.name
    else:
        (root / what).write_text('{"a": ' + deep + "}")
        target = what
    with pytest.raises(CheckpointError, match=rf"{target}.*nested too deeply"):
        distload.plan_job(str(root), device="cpu")


def test_an_integer_tensor_where_the_model_needs_floats_is_named(ckpt, tmp_path):
    root = _copy(ckpt, tmp_path)
    shard = next(p for p in root.glob("*.safetensors") if "model.norm.weight" in
                 {m.name for m in read_safetensors_header(p)})
    from safetensors.torch import load_file
    tensors = load_file(str(shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int32)  # same bytes
    save_file(tensors, str(shard))
    with pytest.raises(LoadError, match=r"model.norm.weight.*floating-point.*int32"):
        distload.plan_job(str(root), device="cpu")


# ----------------------------------------------------------------------------- pickles

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["zip", "legacy", "bare"])
def test_a_pickled_payload_in_a_bin_never_runs(tmp_path, kind):
    marker = tmp_path / "payload-ran"
    state = {"w": torch.ones(2), "evil": _Payload(marker)}
    file = tmp_path / "pytorch_model.bin"
    if kind == "zip":
        torch.save(state, file)
        assert zipfile.is_zipfile(file)
    elif kind == "legacy":
        torch.save(state, file, _use_new_zipfile_serialization=False)
    else:
        file.write_bytes(pickle.dumps(state))
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError) as ei:
        index_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(ei.value)
    assert not marker.exists()


def test_a_byte_view_keeps_its_tensor_alive():
    import gc

    from distload.checkpoint import byte_view

    view = byte_view(torch.full((1 << 20,), 7, dtype=torch.uint8).contiguous())  # a temporary
    gc.collect()
    filler = [torch.zeros(1 << 20, dtype=torch.uint8) for _ in range(8)]  # reuse freed memory
    assert view[0] == 7 and view[len(view) - 1] == 7 and len(filler) == 8
