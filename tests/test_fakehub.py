"""The fake Hub (tests/fakehub.py) against the real huggingface_hub client.

The client reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into huggingface_hub.constants once, at import (and
builds more from them then, e.g. the hosts it trusts with redirects), so each client run is a fresh Python
process with its own environment: one HF_HOME per simulated node, HF_HUB_OFFLINE=0 even where CI exports 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file

from .fakehub import FakeHub

REPO = "acme/tiny-llama"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"

PRELUDE = """
import json, os, time
from pathlib import Path
import huggingface_hub as hh
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
api = HfApi()

def attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return type(e).__name__
"""


def client(home: Path, endpoint: str, code: str, offline: bool = False):
    """Runs `code` (after PRELUDE) in a new Python with the client set up for one node; returns the JSON it
    printed last."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """config.json, README.md, an index and two float32 shards of 128 KiB: more than the first 100 kB that
    get_safetensors_metadata reads of each."""
    d = tmp_path_factory.mktemp("fakehub") / "tiny-llama"
    d.mkdir()
    tensors = [{"model.embed_tokens.weight": torch.arange(32768, dtype=torch.float32).reshape(256, 128)},
               {"lm_head.weight": torch.ones(128, 256), "model.norm.weight": torch.ones(128)}]
    for name, shard in zip(SHARDS, tensors):
        save_file(shard, d / name, metadata={"format": "pt"})
    weight_map = {t: name for name, shard in zip(SHARDS, tensors) for t in shard}
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 2 * 131072 + 512}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    (d / "README.md").write_text("# tiny-llama\n")
    return d


def files_log(hub: FakeHub, file: str) -> list[tuple]:
    """(method, kind, status, bytes, cdn) of each request for `file`."""
    return [(r["method"], r["kind"], r["status"], r["bytes"], r["cdn"])
            for r in hub.stats()["log"] if r["file"] == file]


def test_download_then_rerun_from_cache_then_offline(source, tmp_path):
    home = tmp_path / "node0"
    code = f"print(json.dumps([hf_hub_download({REPO!r}, f, revision=REV) for f in ('config.json', {SHARDS[0]!r})]))"
    with FakeHub() as hub:
        sha = hub.push(REPO, source)
        paths = client(home, hub.url("node0"), code.replace("REV", "'main'"))
        for path, name in zip(paths, ("config.json", SHARDS[0])):
            assert Path(path).read_bytes() == (source / name).read_bytes()
            assert Path(path).parent.name == sha
        config, shard = (source / "config.json").stat().st_size, (source / SHARDS[0]).stat().st_size
        assert hub.stats()["bytes"] == {"node0": {REPO: {"config.json": config, SHARDS[0]: shard}}}
        # a git file: HEAD then GET on the Hub; an LFS file: HEAD answered by a redirect, GET to the CDN
        assert files_log(hub, "config.json") == [("HEAD", "head", 200, 0, False), ("GET", "get", 200, config, False)]
        assert files_log(hub, SHARDS[0]) == [("HEAD", "head", 302, 0, False), ("GET", "get", 200, shard, True)]

        hub.reset()
        assert client(home, hub.url("node0"), code.replace("REV", repr(sha))) == paths
        assert hub.stats()["log"] == []  # revision=sha with the file cached: not one request
        endpoint = hub.url("node0")
    assert client(home, endpoint, code.replace("REV", "'main'"), offline=True) == paths  # server gone


def test_snapshot_allow_patterns_and_listings(source, tmp_path):
    with FakeHub() as hub:
        sha = hub.push(REPO, source)
        out = client(tmp_path / "node1", hub.url("node1"), f"""
            snap = snapshot_download({REPO!r}, allow_patterns=["*.json"])
            info = api.model_info({REPO!r}, revision="main", files_metadata=True)
            print(json.dumps(dict(
                snap=snap, files=sorted(str(p.relative_to(snap)) for p in Path(snap).rglob("*") if p.is_file()),
                sha=info.sha, params=info.safetensors.parameters,
                siblings={{s.rfilename: [s.size, s.blob_id, s.lfs and s.lfs.sha256] for s in info.siblings}},
                listed=sorted(api.list_repo_files({REPO!r})),
                paths=[[p.path, type(p).__name__]
                       for p in api.get_paths_info({REPO!r}, ["config.json", "x", {SHARDS[1]!r}])],
                dry=[hf_hub_download({REPO!r}, f, dry_run=True).will_download
                     for f in ("config.json", {SHARDS[1]!r})],
            )))""")
        assert Path(out["snap"]).name == sha == out["sha"]
        assert out["files"] == ["config.json", INDEX]
        assert hub.stats()["bytes"] == {"node1": {REPO: {f: (source / f).stat().st_size for f in out["files"]}}}
    names = sorted(p.name for p in source.iterdir())
    assert out["listed"] == sorted(out["siblings"]) == names
    for name in names:
        data = (source / name).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        size, blob_id, sha256 = out["siblings"][name]
        assert size == len(data)
        if name.endswith(".safetensors"):  # LFS: known by the sha256 of the content, the git blob is a pointer
            assert sha256 == hashlib.sha256(data).hexdigest() and blob_id != blob
        else:
            assert sha256 is None and blob_id == blob
    assert out["params"] == {"F32": 32768 + 128 * 256 + 128}
    assert out["paths"] == [["config.json", "RepoFile"], [SHARDS[1], "RepoFile"]]
    assert out["dry"] == [False, True]


def test_safetensors_metadata_reads_shard_headers_by_range(source, tmp_path):
    with FakeHub() as hub:
        hub.push(REPO, source)
        out = client(tmp_path / "node0", hub.url("node0"), f"""
            m = hh.get_safetensors_metadata({REPO!r}, revision="main")
            tensors = {{f: {{n: [t.dtype, t.shape] for n, t in fm.tensors.items()}}
                       for f, fm in m.files_metadata.items()}}
            print(json.dumps(dict(sharded=m.sharded, weight_map=m.weight_map, tensors=tensors)))""")
        for shard in SHARDS:
            # a Range GET redirected to the CDN, which sends the first 100001 bytes of 131 kB: never the whole file
            assert files_log(hub, shard) == [("GET", "range", 302, 0, False), ("GET", "range", 206, 100001, True)]
    assert out["sharded"] is True
    assert out["weight_map"] == json.loads((source / INDEX).read_text())["weight_map"]
    for shard in SHARDS:
        with safe_open(source / shard, "pt") as f:
            expected = {k: [f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()] for k in f.keys()}
        assert out["tensors"][shard] == expected


def test_revisions_and_not_found_errors(source, tmp_path):
    v2 = tmp_path / "v2"
    shutil.copytree(source, v2)
    (v2 / "config.json").write_text('{"model_type": "llama", "hidden_size": 256}')
    with FakeHub() as hub:
        old = hub.push(REPO, source)
        hub.create_ref(REPO, "v1")
        hub.create_ref(REPO, "refs/pr/1")
        new = hub.push(REPO, v2)
        out = client(tmp_path / "node0", hub.url("node0"), f"""
            read = lambda rev: open(hf_hub_download({REPO!r}, "config.json", revision=rev)).read()
            print(json.dumps(dict(
                shas=[api.model_info({REPO!r}, revision=r).sha for r in (None, "main", "v1", "refs/pr/1", {old!r})],
                configs=[read(r) for r in ("main", "v1", {old!r})],
                no_repo=[attempt(hf_hub_download, "acme/nope", "config.json"), attempt(api.model_info, "acme/nope")],
                no_file=[attempt(hf_hub_download, {REPO!r}, "nope.json"),
                         attempt(lambda: list(api.list_repo_tree({REPO!r}, "nope")))],
                no_rev=[attempt(hf_hub_download, {REPO!r}, "config.json", revision="v9"),
                        attempt(api.model_info, {REPO!r}, revision="v9")],
            )))""")
    assert old != new
    assert out["shas"] == [new, new, old, old, old]
    assert out["configs"] == [(v2 / "config.json").read_text()] + [(source / "config.json").read_text()] * 2
    assert out["no_repo"] == ["RepositoryNotFoundError"] * 2
    assert out["no_file"] == ["RemoteEntryNotFoundError"] * 2 and issubclass(RemoteEntryNotFoundError,
                                                                             EntryNotFoundError)
    assert out["no_rev"] == ["RevisionNotFoundError"] * 2


def test_faults(source, tmp_path):
    home = tmp_path / "node0"
    with FakeHub(faults=[{"file": SHARDS[0], "kind": "short"}]) as hub:
        hub.push(REPO, source)
        hub.add_fault(SHARDS[1], "truncate", times=1)
        hub.add_fault(INDEX, "truncate")
        hub.add_fault("config.json", "error", times=1)
        hub.add_fault("README.md", "missing")
        out = client(home, hub.url("node0"), f"""
            time.sleep = lambda s: None  # the client waits 1 s before each resume and each retry
            print(json.dumps({{f: attempt(hf_hub_download, {REPO!r}, f) for f in
                              ("config.json", "README.md", {SHARDS[0]!r}, {SHARDS[1]!r}, {INDEX!r})}}))""")
        assert out["README.md"] == "RemoteEntryNotFoundError"
        assert out[SHARDS[0]] == "OSError"  # short body: "Consistency check failed"
        assert out[INDEX] == "RemoteProtocolError"  # after 5 retries that got no byte further
        for name in ("config.json", SHARDS[1]):
            assert Path(out[name]).read_bytes() == (source / name).read_bytes()
        half, size = (source / SHARDS[1]).stat().st_size // 2, (source / SHARDS[1]).stat().st_size
        # the client counts bytes received by 10 MB chunks: a connection dropped within the first chunk loses
        # them all, and it asks again from the start (a Range from the last whole chunk otherwise)
        assert files_log(hub, SHARDS[1])[1:] == [("GET", "get", 200, half, True), ("GET", "get", 200, size, True)]
        assert [r[2] for r in files_log(hub, "config.json")] == [500, 200, 200]  # HEAD retried, then GET
        index_half = (source / INDEX).stat().st_size // 2
        assert [r[1:4] for r in files_log(hub, INDEX)[1:]] == [("get", 200, index_half)] * 6
    # no complete-looking file left: no blob but the two good ones, no .incomplete, no snapshot link
    blobs = sorted(p.name for p in (home / "hub" / "models--acme--tiny-llama" / "blobs").iterdir())
    assert blobs == sorted(Path(out[name]).resolve().name for name in ("config.json", SHARDS[1]))
    snapshot = Path(out["config.json"]).parent
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(["config.json", SHARDS[1]])


def call(port: int, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data), timeout=10) as r:
        return json.loads(r.read())


def test_subprocess_server_and_control_endpoints(source, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fakehub.py")), "--repo", f"{REPO}={source}",
                             "--port", "0", "--port-file", str(port_file),
                             "--fault", json.dumps({"file": "README.md", "kind": "missing", "node": "node2"})],
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        port = int(port_file.read_text())
        out = client(tmp_path / "node2", f"http://127.0.0.1:{port}/node2", f"""
            print(json.dumps([attempt(hf_hub_download, {REPO!r}, f) for f in ("config.json", "README.md")]))""")
        assert Path(out[0]).read_bytes() == (source / "config.json").read_bytes()
        assert out[1] == "RemoteEntryNotFoundError"
        stats = call(port, "/_stats")
        assert stats["bytes"] == {"node2": {REPO: {"config.json": (source / "config.json").stat().st_size}}}
        assert stats["requests"]["node2"]["head"] == 2

        call(port, "/_fault", {"file": "config.json", "kind": "slow", "delay": 0.2})
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/node3/{REPO}/resolve/main/config.json") as r:
            assert r.read() == (source / "config.json").read_bytes()
        assert time.monotonic() - start >= 0.2
        size = (source / "config.json").stat().st_size
        assert call(port, "/_stats")["bytes"] == {"node2": {REPO: {"config.json": size}},
                                                  "node3": {REPO: {"config.json": size}}}
        assert call(port, "/_fault", {"clear": True}) == {"faults": []}

        (tmp_path / "v2").mkdir()
        (tmp_path / "v2" / "config.json").write_text("{}")
        sha = call(port, "/_push", {"repo": REPO, "dir": str(tmp_path / "v2")})["sha"]
        assert call(port, f"/api/models/{REPO}")["sha"] == sha
        call(port, "/_reset")
        assert call(port, "/_stats") == {"requests": {}, "bytes": {}, "log": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_bandwidth_is_shared_by_a_nodes_connections(source):
    """limit_bandwidth caps each node's bodies as one link: two downloads through node0 at once take twice as
    long as one; node1's runs beside them at its own rate."""
    import threading

    size = (source / SHARDS[0]).stat().st_size

    def fetch(node: str, out: dict):
        start = time.monotonic()
        with urllib.request.urlopen(f"{hub.url(node)}/{REPO}/resolve/main/{SHARDS[0]}") as r:
            assert r.read() == (source / SHARDS[0]).read_bytes()
        out[node + str(threading.get_ident())] = time.monotonic() - start

    with FakeHub() as hub:
        hub.push(REPO, source)
        hub.limit_bandwidth(size / 0.4)  # one shard in 0.4 s
        times: dict = {}
        threads = [threading.Thread(target=fetch, args=(n, times)) for n in ("node0", "node0", "node1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    node0 = sorted(v for k, v in times.items() if k.startswith("node0"))
    node1 = [v for k, v in times.items() if k.startswith("node1")]
    assert node0[1] >= 0.75 and 0.35 <= node1[0] < node0[1]
