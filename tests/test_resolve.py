"""`resolve_model`: local paths, and hub ids served from a hand-made cache. No network:
HF_HUB_OFFLINE=1 throughout, and the one download path is a monkeypatched stand-in."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from distload.sources import parse_hub_id, resolve_model
from distload.errors import CheckpointError

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def fake_cache(root: Path, repo: str = "org/name", sha: str = SHA, ref: str = "main") -> Path:
    """Lay out models--org--name/{refs/<ref>, snapshots/<sha>/} as huggingface_hub does."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(sha)
    return snap


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


def test_hub_id_from_cache(tmp_path):
    snap = fake_cache(tmp_path)
    assert resolve_model("org/name", cache_dir=tmp_path) == str(snap)
    assert resolve_model("org/name@main", cache_dir=tmp_path) == str(snap)
    assert resolve_model(f"org/name@{SHA}", cache_dir=tmp_path) == str(snap)


def test_hub_cache_from_env_read_at_call_time(tmp_path, monkeypatch):
    snap = fake_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("org/name") == str(snap)


def test_hub_id_not_cached_offline(tmp_path):
    fake_cache(tmp_path, repo="org/other")
    with pytest.raises(CheckpointError) as ei:
        resolve_model("org/name", cache_dir=tmp_path)
    assert "not a local path, and hub id org/name is not in the local cache (HF_HUB_OFFLINE=1)" in str(ei.value)


def test_hub_revision_not_cached_offline(tmp_path):
    fake_cache(tmp_path)
    with pytest.raises(CheckpointError, match="org/name@v2 is not in the local cache"):
        resolve_model("org/name@v2", cache_dir=tmp_path)


def test_cache_miss_then_download(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / "downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("org/name@dev", cache_dir=tmp_path) == str(tmp_path / "downloaded")
    assert [kw["local_files_only"] for _, kw in calls] == [True, False]
    for repo_id, kw in calls:
        assert repo_id == "org/name" and kw["revision"] == "dev" and kw["cache_dir"] == tmp_path
        assert set(kw["allow_patterns"]) == {"*.json", "*.safetensors", "tokenizer*", "*.model"}


def test_download_failure_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def fake_snapshot_download(repo_id, **kw):
        if kw["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="org/name is not in the local cache, and downloading it "
                                              "failed: OSError: connection refused"):
        resolve_model("org/name", cache_dir=tmp_path)
