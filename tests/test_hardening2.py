"""Hardening, round 2 (issue 21), each fault made for real: a symlink and a FIFO in the
offload store, a hub that answers garbage once, a 500 or ignores `Range`, a flipped byte
under `--verify-checksums`, an empty input file.

Reference tensors come from safetensors' own reader."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distload.checkpoint import index_checkpoint
from distload.offload import (OffloadError, OffloadStore, ensure_entries, foreign_entries, gc_store,
                              verify_store)
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hard2") / "ckpt"
    return make_checkpoint(tiny_config(num_hidden_layers=2), out, num_shards=2, dtype="float32", seed=7)


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging the suite (a FIFO opened blindly blocks forever)."""
    def boom(*_):
        raise AssertionError(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _reference(meta, dtype: str) -> torch.Tensor:
    with safe_open(meta.file, "pt") as f:
        return f.get_tensor(meta.name).to(getattr(torch, dtype))


def _offload(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m distload.offload ARGS` in this process: (exit code, stdout, stderr)."""
    from distload.offload.__main__ import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- the offload store

def test_gc_verify_and_writes_never_follow_a_linked_data_dir(ckpt, tmp_path, capsys):
    index = index_checkpoint(ckpt)
    root = tmp_path / "off"
    entries, _ = ensure_entries(OffloadStore(root), index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    sub = sorted((root / "data").iterdir())[0]
    # The user's folder elsewhere, holding a file named like an entry no model needs.
    outside = tmp_path / "users-folder"
    shutil.move(sub, outside)
    victim = outside / (sub.name + "0" * 62)
    victim.write_bytes(b"the user's file")
    sub.symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())

    code, out, err = _offload(capsys, "gc", str(root))
    assert code == 1 and f"left alone: {sub} is a symlink to {outside}" in err, out + err
    assert "removed 0 entries" in out
    assert sorted(p.name for p in outside.iterdir()) == before and victim.read_bytes() == b"the user's file"
    code, out, _ = _offload(capsys, "verify", str(root))
    assert code == 1 and f"{sub} is a symlink to {outside}" in out
    # A load that needs an entry under it says so, and writes nothing there.
    with pytest.raises(OffloadError, match=rf"{sub} is a symlink to {outside}, not a directory"):
        ensure_entries(OffloadStore(root), index.tensors, checkpoint=str(ckpt), dtype="bfloat16")
    assert sorted(p.name for p in outside.iterdir()) == before
    assert all(os.path.isfile(e.entry_file) for e in entries.values() if not e.key.startswith(sub.name))


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_an_entry_that_is_a_fifo_or_a_link_is_named_and_rewritten(ckpt, tmp_path, kind, caplog, capsys):
    index = index_checkpoint(ckpt)
    root = tmp_path / "off"
    store = OffloadStore(root)
    name, meta = max(index.tensors.items(), key=lambda kv: kv[1].length)
    entry = ensure_entries(store, {name: meta}, checkpoint=str(ckpt), dtype="bfloat16")[0][name]
    path = Path(entry.entry_file)
    outside = tmp_path / "elsewhere"
    shutil.copy(path, outside)                      # a valid entry, outside the store
    original = outside.read_bytes()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(outside)
    what = "a FIFO" if kind == "fifo" else f"a symlink to {outside}"
    with _deadline(20):
        assert foreign_entries(store) == [(path, f"{what}, not an entry file")]
        code, out, _ = _offload(capsys, "verify", str(root))
        assert code == 1 and f"{path} is {what}" in out
        code, _, err = _offload(capsys, "ls", str(root))
        assert code == 0 and f"not an entry: {path} is {what}" in err
        assert store.lookup(entry.key) is None
        fixed = ensure_entries(OffloadStore(root), {name: meta}, checkpoint=str(ckpt),
                               dtype="bfloat16")[0][name]
    assert f"{path} is {what}" in caplog.text and "rewriting it" in caplog.text
    assert os.path.isfile(path) and not os.path.islink(path)
    assert torch.equal(fixed.read(), _reference(meta, "bfloat16"))
    assert outside.read_bytes() == original          # the link's target untouched
    # gc removes such a name (the name only) when no model needs it
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.symlink_to(outside)
    (root / "manifest.json").unlink()
    with _deadline(20):
        res = gc_store(OffloadStore(root))
    assert res.foreign == [f"{path} ({what})"] and not os.path.lexists(path)
    assert outside.read_bytes() == original and verify_store(OffloadStore(root)) == []


# ----------------------------------------------------------------------------- the hub's headers

_PLAN = """
import json, logging, sys, time
from pathlib import Path
from distload.sources.hub_index import remote_index
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("distload").addHandler(handler)
results = []
for step in sys.argv[1:]:
    if step.startswith("spoil:"):      # bytes 8..39 of a kept file garbled, as a bad disk would
        kept = Path(step[6:])
        data = kept.read_bytes()
        kept.write_bytes(data[:8] + b"~" * 32 + data[40:])
        continue
    start = time.monotonic()
    try:
        r = remote_index("acme/tiny", None)
        out = dict(ok=sorted(r.index.tensors), sha=r.sha)
    except Exception as e:
        out = dict(error=f"{type(e).__name__}: {e}")
    out["seconds"] = time.monotonic() - start
    out["log"], lines[:] = list(lines), []
    results.append(out)
print(json.dumps(results))
"""


def _plan(node: Path, endpoint: str, *steps: str) -> list[dict]:
    """Rank 0's planning from the hub as one node's fresh process, once per step "plan"
    (default: one), spoiling a kept file at each step "spoil:PATH": each plan's result
    and log lines."""
    from .fakehub import client_env

    r = subprocess.run([sys.executable, "-c", _PLAN, *(steps or ["plan"])], env=client_env(endpoint, node),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def _served(hub, file: str) -> int:
    return sum(r["bytes"] for r in hub.stats()["log"] if r["file"] == file)


def test_a_garbled_header_is_never_kept_and_a_bad_kept_one_is_fetched_again(ckpt, tmp_path):
    from .fakehub import FakeHub

    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    shard = shards[0]
    reference = sorted(index_checkpoint(ckpt).tensors)
    with FakeHub() as hub:
        sha = hub.push("acme/tiny", ckpt)
        hub.add_fault(shard, "garbage", times=1)            # one bad answer, then the right bytes
        kept = tmp_path / "node" / "distload" / "hub" / "models--acme--tiny" / sha / "headers" / shard
        first, second, third = _plan(tmp_path / "node", hub.url(), "plan", "plan", f"spoil:{kept}", "plan")
        ranges = [r["file"] for r in hub.stats()["log"] if r["kind"] == "range" and r["cdn"]]
        url = hub.url()
    assert first["error"].startswith(f"CheckpointError: acme/tiny@{sha}: {shard} (its header as "
                                     f"{url} sent it; nothing was kept): header is not valid JSON"), first
    assert second["ok"] == reference            # the bad answer was not kept: asked again
    # bytes spoiled in the cache itself (an older distload kept them, or the disk did)
    assert third["ok"] == reference
    assert any(line.startswith(f"dropping a bad header from distload's cache and fetching it again: {kept}: "
                               "header is not valid JSON") for line in third["log"]), third["log"]
    assert ranges.count(shard) == 3                      # 3 asks of the bad one
    # the others: kept by the first plan, or asked again when it stopped before they landed
    assert all(1 <= ranges.count(f) <= 2 for f in shards if f != shard), ranges
    assert kept.read_bytes() == (ckpt / shard).read_bytes()[:len(kept.read_bytes())]


def test_an_http_500_on_a_header_fails_at_once_naming_it(ckpt, tmp_path):
    from .fakehub import FakeHub

    shard = sorted(p.name for p in ckpt.glob("*.safetensors"))[0]
    with FakeHub() as hub:
        sha = hub.push("acme/tiny", ckpt)
        hub.add_fault(shard, "error", status=500)
        out, = _plan(tmp_path / "node", hub.url())
    assert out["seconds"] < 5, out
    assert out["error"].startswith(f"CheckpointError: acme/tiny@{sha}: {shard}: reading its safetensors header "
                                   "failed: HfHubHTTPError: Server error '500 Internal Server Error'"), out


def test_a_server_ignoring_range_is_read_only_as_far_as_the_header(tmp_path):
    from safetensors.torch import save_file

    from .fakehub import FakeHub

    repo = tmp_path / "big"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(16 << 20, dtype=torch.uint8)}, str(repo / "model.safetensors"))   # 16 MiB
    size = (repo / "model.safetensors").stat().st_size
    with FakeHub() as hub:
        hub.push("acme/tiny", repo)
        hub.add_fault("model.safetensors", "norange")
        out, = _plan(tmp_path / "node", hub.url())
        served = _served(hub, "model.safetensors")
    assert out["ok"] == ["w"], out
    assert any("answered a range request with HTTP 200 (the whole file): reading only the header's bytes" in line
               for line in out["log"]), out
    assert served < size // 4, (served, size)           # not the whole shard


# ----------------------------------------------------------------------------- --verify-checksums

def _flip(path: Path) -> None:
    """One bit of the middle byte, size and modification time kept."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x04]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distload.load", "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_verify_checksums_catches_a_flipped_byte_in_a_local_checkpoint(ckpt, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(ckpt, root)
    cache = tmp_path / "cache"
    argv = ["--model", str(root), "--max-new-tokens", "0", "--cache-dir", str(cache)]
    first = _cli(*argv, "--verify-checksums")
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = next((cache / "checksums").glob("*.json"))
    assert f"recorded the sha256 of 2 file(s) of {root} in {manifest}" in first.stderr
    recorded = json.loads(manifest.read_text())["files"]
    import hashlib
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*.safetensors")}
    shard = sorted(root.glob("*.safetensors"))[1]
    _flip(shard)
    bad = _cli(*argv, "--verify-checksums")
    assert bad.returncode == 1
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith(f"[rank 0] ERROR CheckpointError: {shard} has sha256 ") and str(manifest) in line, line
    assert "Traceback" not in bad.stderr


def test_verify_checksums_checks_hub_files_against_the_hubs_sha256(ckpt, tmp_path):
    import hashlib

    from .fakehub import FakeHub, client_env

    code = """
import json, os, sys
from distload.sources import HubSource
s = HubSource("acme/tiny")
files = sorted(s.index().relative()[1])
s.fetch(files)
out = dict(checked=s.verify(files), blob=os.path.realpath(os.path.join(s.root(), files[0])))
with open(out["blob"], "r+b") as f:      # one bit flipped, same size
    f.seek(os.path.getsize(out["blob"]) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x04]))
try:
    s.verify(files)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""
    with FakeHub() as hub:
        sha = hub.push("acme/tiny", ckpt)
        r = subprocess.run([sys.executable, "-c", code], env=client_env(hub.url(), tmp_path / "node"),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    shard = sorted(p.name for p in ckpt.glob("*.safetensors"))[0]
    blob = Path(out["blob"])
    assert out["checked"] == 2
    assert blob.name == hashlib.sha256((ckpt / shard).read_bytes()).hexdigest()    # the hub's sha256
    assert out["error"].startswith(f"CheckpointError: {blob} ({shard} of acme/tiny@{sha}) has sha256 "), out
    assert f"but the hub gives {blob.name}: the file is corrupt" in out["error"]


# ----------------------------------------------------------------------------- signals in every phase

REPEATS = int(os.environ.get("DISTLOAD_TEST_REPEATS", "1"))   # the 10x: DISTLOAD_TEST_REPEATS=10


def _torchrun(nproc: int, argv: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    full.pop("TORCHELASTIC_ERROR_FILE", None)
    return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            process_group=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("phase", ["header fetch", "download", "offload write"])
def test_a_signal_to_torchrun_stops_every_phase(ckpt, tmp_path, phase):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM to torchrun's process group while rank 0
    fetches hub headers (its planning), while the node leader downloads, or while a rank
    writes an offload entry: every rank stops within seconds, with one line and 130/143
    (reading and generating: tests/test_exits.py). Alternates the signal per attempt."""
    from .fakehub import FakeHub, client_env
    from .mp import worker

    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    with FakeHub() as hub:
        hub.push("acme/tiny", ckpt)
        model: list[str] = ["--model", "acme/tiny"]
        if phase == "download":          # headers kept beforehand: the run goes straight to downloading
            _plan(tmp_path / "kept", hub.url())
        if phase == "offload write":     # 4 layers at 200 KB per rank: layers stream from the disk tier
            local = make_checkpoint(tiny_config(num_hidden_layers=4), tmp_path / "local", num_shards=2,
                                    dtype="float32", seed=8)
            model = ["--model", str(local), "--dtype", "bfloat16", "--max-seq-len", "16",
                     "--max-memory", "0=200KB,1=200KB,cpu=0,disk=1GB", "--offload-dir", str(tmp_path / "off")]
        for attempt in range(REPEATS):
            signum = (signal.SIGINT, signal.SIGTERM)[(attempt + (phase == "download")) % 2]
            node, codes = tmp_path / str(attempt), tmp_path / f"codes{attempt}"
            codes.mkdir()
            if phase == "download":
                shutil.copytree(tmp_path / "kept" / "distload", node / "distload")
            hub.clear_faults()
            for shard in shards:          # every 64 KiB of a shard takes 5 s to come
                hub.add_fault(shard, "slow", delay=5.0)
            # each attempt its own URL prefix: a request of the last one may still be going out
            env = {**client_env(hub.url(f"n{attempt}"), node), "DISTLOAD_TEST_EXIT_DIR": str(codes),
                   "DISTLOAD_TEST_SLOW_WRITE": "30"}
            proc = _torchrun(2, [worker("cli_slowed.py"), "--device", "cpu", *model, "--max-new-tokens", "0"], env)
            output: list[str] = []
            reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
            reader.start()

            def there() -> bool:
                if phase == "offload write":
                    return any("writing (slowed)" in line for line in output)
                kind = "range" if phase == "header fetch" else "get"
                return any(r["cdn"] and r["kind"] == kind and r["file"] in shards and r["node"] == f"n{attempt}"
                           for r in hub.active())

            try:
                deadline = time.monotonic() + 90
                while not there():
                    assert time.monotonic() < deadline and proc.poll() is None, "".join(output)[-3000:]
                    time.sleep(0.05)
                time.sleep(0.3)
                os.killpg(proc.pid, signum)
                start = time.monotonic()
                proc.wait(30)
                took = time.monotonic() - start
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reader.join(10)
            text = "".join(output)
            name = signal.Signals(signum).name
            assert took < 10, (attempt, took, text[-3000:])
            workers = [line for line in text.splitlines() if line.startswith("[rank")]
            last = {r: [w for w in workers if w.startswith(f"[rank {r}]")][-1:] for r in (0, 1)}
            assert last == {r: [f"[rank {r}] WARNING interrupted by {name}: stopping"] for r in (0, 1)}, \
                (attempt, text[-3000:])
            assert "terminate called" not in text and not re.search(r'File ".*/distload/', text), text[-3000:]
            assert {p.name: p.read_text() for p in codes.glob("rank*")} == \
                {f"rank{r}": str(128 + signum) for r in (0, 1)}, (attempt, text[-3000:])
        if phase == "offload write":      # nothing half-written left visible
            assert not list((tmp_path / "off").rglob("*.tmp.*"))
            assert verify_store(OffloadStore(tmp_path / "off")) == []


@pytest.mark.multiprocess
@pytest.mark.parametrize("phase", ["load", "generate"])
def test_three_ranks_one_sigkilled_the_survivors_name_it(tiny_ckpt, tmp_path, phase):
    """Under torchrun, rank 1 of 3 SIGKILLed while it reads its stage or mid-generation:
    ranks 0 and 2 each end with one line naming rank 1 (no gloo text) and exit 1, also
    when torchrun's SIGTERM reaches them first."""
    from .mp import worker

    slow = {"load": {"DISTLOAD_TEST_SLOW_READ": "60", "DISTLOAD_TEST_SLOW_RANK": "1"},
            "generate": {"DISTLOAD_TEST_SLOW_STEP": "0.3"}}[phase]
    marker = {"load": "[rank 1] WARNING reading (slowed)", "generate": "generating (slowed)"}[phase]
    proc = _torchrun(3, [worker("cli_slowed.py"), "--device", "cpu", "--model", str(tiny_ckpt),
                         "--input-ids", "1,2,3", "--max-new-tokens", "200"],
                     {**slow, "DISTLOAD_TEST_EXIT_DIR": str(tmp_path)})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any(marker in line for line in output):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(output)[-3000:]
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    text = "".join(output)
    assert {p.name: p.read_text() for p in tmp_path.glob("rank*")} == {"rank0": "1", "rank2": "1"}, text[-3000:]
    for r in (0, 2):
        last = [line for line in text.splitlines() if line.startswith(f"[rank {r}]")][-1]
        assert last.startswith(f"[rank {r}] ERROR rank 1 died (connection lost)"), text[-3000:]
    assert "gloo" not in text and "GLHF" not in text and "see its own error" not in text, text[-3000:]


# ----------------------------------------------------------------------------- inputs

def test_an_empty_input_file_leaves_an_empty_output_file(ckpt, tmp_path):
    empty, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    empty.write_text("")
    out.write_text('{"input_ids": [1], "output_ids": [7, 7]}\n')      # an earlier run's results
    done = _cli("--model", str(ckpt), "--input-file", str(empty), "--output-file", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text() == "" and not list(tmp_path.glob("out.jsonl.tmp*"))
    assert f"no prompts in {empty}: nothing to generate" in done.stderr


@pytest.mark.multiprocess
def test_every_rank_exits_with_the_causes_code(ckpt, tmp_path):
    from distload.cli.exits import USAGE

    from .mp import Ranks, worker

    context = tiny_config()["max_position_embeddings"]       # a prompt one token past the context
    argv = [worker("cli_slowed.py"), "--device", "cpu", "--model", str(ckpt),
            "--input-ids", ",".join(["1"] * context), "--max-new-tokens", "1"]
    job = Ranks([argv, argv], tmp_path)
    assert job.wait(60) == [USAGE, USAGE], (job.stderr(0)[-1500:], job.stderr(1)[-1500:])
    assert job.stderr(1).strip().splitlines()[-1].startswith("[rank 1] ERROR rank 0 failed: UsageError: ")
