"""`resolve_model` and the hub source: local paths and hub ids parsed in process; hub ids planned and
downloaded against the fake hub (tests/fakehub.py) by the real huggingface_hub client, each client run a
fresh Python whose environment (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, DISTLOAD_CACHE) is that of one node,
since the client reads it at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from distload.errors import CheckpointError
from distload.sources import parse_hub_id, resolve_model
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .fakehub import FakeHub, client_env

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_local_directory_and_files(tmp_path, monkeypatch):
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(str(tmp_path / "m.safetensors")) == str(tmp_path / "m.safetensors")
    assert resolve_model(str(tmp_path / "pytorch_model.bin")) == str(tmp_path / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m.safetensors") == str(tmp_path / "m.safetensors")
    assert resolve_model(".") == str(tmp_path)


def test_local_dir_shaped_like_hub_id_wins(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == str(tmp_path / "org" / "name")


def test_existing_non_checkpoint_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes.txt.*not a checkpoint"):
        resolve_model(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("spec", ["/no/such/dir", "./nope", "../a/b/c", "~/nope-distload", "x.safetensors",
                                  "org/model.safetensors", "a/b/c", "bad name/x"])
def test_neither_path_nor_hub_id(spec):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_model(spec)


@pytest.mark.parametrize(
    "spec, want",
    [
        ("org/name", ("org/name", None)),
        ("Qwen/Qwen2-0.5B", ("Qwen/Qwen2-0.5B", None)),
        ("meta-llama/Llama-3.1-8B@main", ("meta-llama/Llama-3.1-8B", "main")),
        (f"org/name@{SHA}", ("org/name", SHA)),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("name", None), ("org/", None), ("/abs/path", None), ("./rel", None),
        ("org/na--me", None), ("org/name.git", None), ("org/name@", None), ("org/-x", None),
    ],
)
def test_parse_hub_id(spec, want):
    assert parse_hub_id(spec) == want


# ---------------------------------------------------------------- hub ids against the fake hub

PRELUDE = """
import json, os
from pathlib import Path
from distload.sources import HubSource, resolve_model
from distload.sources.hub_index import remote_index

def attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
"""


def client(node: Path, endpoint: str, code: str, *, offline: bool = False):
    """Runs `code` (after PRELUDE) as one node's process; returns the JSON it printed last."""
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                       env=client_env(endpoint, node, offline=offline), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def asked(hub: FakeHub) -> list[tuple[str, str | None]]:
    """(kind, file) of each request but the client's telemetry."""
    return [(r["kind"], r["file"]) for r in hub.stats()["log"] if r["kind"] != "api" or "/tree/" in r["path"]]


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resolve") / "tiny"
    make_checkpoint(tiny_config(num_hidden_layers=2), d, num_shards=3, dtype="float32", seed=4)
    (d / "tokenizer.json").write_text("{}")
    (d / "README.md").write_text("# tiny\n")
    return d


def test_plan_from_headers_then_download_then_offline(repo_dir, tmp_path):
    """Rank 0 indexes from range reads (no shard downloaded) and keeps headers and listing keyed by commit;
    a download by commit then asks for the files alone; offline, with the server gone, both work again."""
    index = """
        r = remote_index("acme/tiny", None)
        out = dict(sha=r.sha, support=r.support, root=r.index.root, sizes=r.index.relative()[1],
                   tensors=sorted(r.index.tensors), config=r.index.config)"""
    shards = sorted(p.name for p in repo_dir.glob("*.safetensors"))
    with FakeHub() as hub:
        sha = hub.push(REPO, repo_dir)
        snapshot = tmp_path / "node0" / "hf" / "hub" / "models--acme--tiny" / "snapshots" / sha
        out = client(tmp_path / "node0", hub.url("node0"), index + "\n        print(json.dumps(out))")
        kinds = asked(hub)
        assert sorted(f for k, f in kinds if k == "get") == ["config.json", "model.safetensors.index.json"]
        assert sorted(f for k, f in kinds if k == "range") == sorted(shards * 2)   # the hub's 302, the CDN's 206
        assert sorted(os.listdir(snapshot)) == ["config.json", "model.safetensors.index.json"]
        kept = tmp_path / "node0" / "distload" / "hub" / "models--acme--tiny" / sha
        assert sorted(os.listdir(kept / "headers")) == shards and (kept / "files.json").is_file()

        hub.reset()
        path = client(tmp_path / "node0", hub.url("node0"), f"""
            print(json.dumps(resolve_model("acme/tiny@{sha}")))""")
        # by commit, with config and headers kept: the missing files alone, each by one HEAD and one GET
        assert sorted(f for k, f in asked(hub) if k == "get") == sorted([*shards, "tokenizer.json"])
        assert {k for k, _ in asked(hub)} == {"head", "get"}
        endpoint = hub.url("node0")
    assert out["sha"] == sha and out["root"] == str(snapshot) == path
    assert out["sizes"] == {f: (repo_dir / f).stat().st_size for f in shards}
    assert out["support"] == ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    assert out["config"] == json.loads((repo_dir / "config.json").read_text())
    wanted = sorted(p.name for p in repo_dir.iterdir() if p.name != "README.md")
    assert sorted(os.listdir(path)) == wanted
    for name in wanted:
        assert (Path(path) / name).read_bytes() == (repo_dir / name).read_bytes()
    again = client(tmp_path / "node0", endpoint, index + """
        print(json.dumps([out, resolve_model("acme/tiny")]))""", offline=True)
    assert again == [out, path]


def test_revisions_resolve_to_their_commit(repo_dir, tmp_path):
    v2 = tmp_path / "v2"
    make_checkpoint(tiny_config(num_hidden_layers=3), v2, num_shards=2, dtype="float32", seed=5)
    with FakeHub() as hub:
        old = hub.push(REPO, repo_dir)
        hub.create_ref(REPO, "v1")
        new = hub.push(REPO, v2)
        out = client(tmp_path / "node0", hub.url("node0"), f"""
            shas = {{}}
            for rev in ("", "@main", "@v1", "@{old}"):
                s = HubSource("acme/tiny" + rev)
                idx = s.index()
                shas[rev] = [s.identity()["revision"], len(idx.files), idx.config["num_hidden_layers"]]
            print(json.dumps(shas))""")
        endpoint = hub.url("node0")
    assert out == {"": [new, 2, 3], "@main": [new, 2, 3], "@v1": [old, 3, 2], f"@{old}": [old, 3, 2]}
    # offline, huggingface_hub's cache maps a branch or tag to the commit it saw last
    offline = client(tmp_path / "node0", endpoint, """
        print(json.dumps([HubSource(s).index().config["num_hidden_layers"] for s in ("acme/tiny@v1", "acme/tiny")]))""",
        offline=True)
    assert offline == [2, 3]


def test_offline_uses_a_snapshot_the_cache_already_holds(repo_dir, tmp_path):
    """What users had before distload kept headers: a snapshot_download'ed repo, then offline."""
    with FakeHub() as hub:
        hub.push(REPO, repo_dir)
        client(tmp_path / "node0", hub.url("node0"), """
            from huggingface_hub import snapshot_download
            print(json.dumps(snapshot_download("acme/tiny")))""")
        endpoint = hub.url("node0")
    out = client(tmp_path / "node0", endpoint, """
        print(json.dumps([resolve_model("acme/tiny"), attempt(resolve_model, "acme/other")]))""", offline=True)
    assert sorted(os.listdir(out[0])) == sorted(p.name for p in repo_dir.iterdir())
    assert out[1].startswith("CheckpointError: acme/other@main: config.json is not in this node's hub cache "
                             "and HF_HUB_OFFLINE=1 forbids downloading it")


def test_large_header_single_file_and_errors(tmp_path):
    """A header past the first 100 kB range takes a second range; a lone model.safetensors; a missing repo,
    revision or config, each an error naming it."""
    d = tmp_path / "wide"
    d.mkdir()
    tensors = {f"model.layers.{i}.a_rather_long_parameter_name_for_a_wide_header.weight": torch.full((2,), float(i))
               for i in range(1500)}
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "llama"}')
    header = int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")
    assert header > 100_000
    (tmp_path / "noconfig").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "noconfig" / "model.safetensors")
    with FakeHub() as hub:
        hub.push("acme/wide", d)
        hub.push("acme/noconfig", tmp_path / "noconfig")
        out = client(tmp_path / "node0", hub.url("node0"), """
            r = remote_index("acme/wide", None)
            print(json.dumps(dict(n=len(r.index.tensors), files=r.index.relative()[1], header=r.index.header_bytes,
                                  errors=[attempt(remote_index, "acme/nope", None),
                                          attempt(remote_index, "acme/wide", "v9"),
                                          attempt(remote_index, "acme/noconfig", None)])))""")
        ranges = [r["bytes"] for r in hub.stats()["log"] if r["kind"] == "range" and r["cdn"]]
    assert out["n"] == 1500 and out["files"] == {"model.safetensors": (d / "model.safetensors").stat().st_size}
    assert out["header"] == 8 + header
    assert ranges == [100_000, 8 + header - 100_000]
    nope, rev, noconfig = out["errors"]
    assert nope.startswith("CheckpointError: acme/nope@main: config.json: download failed: RepositoryNotFoundError")
    assert rev.startswith("CheckpointError: acme/wide@v9: config.json: download failed: RevisionNotFoundError")
    assert noconfig.startswith("CheckpointError: acme/noconfig@main: config.json: download failed: "
                               "RemoteEntryNotFoundError")
