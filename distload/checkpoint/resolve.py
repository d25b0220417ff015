"""Turning `--model` into a local checkpoint path: a path as given, or a hub snapshot.

Rank 0 resolves once and passes the path on, so that only one process ever talks to the
hub. The cache is tried first (no network), and the network only where it is allowed.
"""

from __future__ import annotations

import os
import re

from distload.errors import CheckpointError
from distload.log import logger

__all__ = ["resolve_model", "parse_hub_id", "HUB_PATTERNS"]

# What a load needs from a hub repo: config, weights, tokenizer; never *.bin, *.pt, *.h5.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?")
_TRUE = {"1", "true", "yes", "on"}


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` when `spec` is no hub id.

    Example::

        parse_hub_id("Qwen/Qwen2-0.5B")        # ("Qwen/Qwen2-0.5B", None)
        parse_hub_id("./ckpt")                 # None
    """
    m = _HUB_ID.fullmatch(spec)
    if m is None:
        return None
    repo = m["repo"]
    # The hub forbids these; a name like this is a mistyped path, not a repo.
    if "--" in repo or ".." in repo or repo.endswith((".git", *_CHECKPOINT_SUFFIXES)):
        return None
    return repo, m["rev"]


def _offline() -> bool:
    # Read at call time: huggingface_hub reads it once, at import.
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _local(spec: str) -> str | None:
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if not path.endswith(_CHECKPOINT_SUFFIXES):
            raise CheckpointError(
                f"{path}: not a checkpoint file "
                "(expected a directory, .safetensors, .bin or *.index.json)"
            )
        return path
    return None


def resolve_model(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Return the absolute local path of checkpoint `spec` (rank 0 only).

    `spec` is an existing directory or `.safetensors`/`.bin` file, or a hub id
    ``org/name`` or ``org/name@revision``. A hub id is looked up in the local cache first
    (no network); failing that it is downloaded (config, safetensors weights, tokenizer),
    unless ``HF_HUB_OFFLINE=1``. `cache_dir` defaults to ``$HF_HUB_CACHE``, read now.

    Example::

        path = resolve_model("Qwen/Qwen2-0.5B")     # .../snapshots/<sha>
        idx = index_checkpoint(path)
    """
    spec = os.fspath(spec)
    local = _local(spec)
    if local is not None:
        return local
    hub = parse_hub_id(spec)
    if hub is None:
        raise CheckpointError(f"no such file or directory: {spec}")
    repo, revision = hub
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
    at = f"{repo}@{revision}" if revision else repo

    from huggingface_hub import snapshot_download  # import late: the CLI need not pay for it

    def fetch(local_only: bool) -> str:
        return snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_PATTERNS,
            local_files_only=local_only,
        )

    try:
        path = fetch(True)
        logger.info("%s: using cached snapshot %s", at, path)
        return os.path.abspath(path)
    except (OSError, ValueError) as e:  # not cached, or cached but incomplete
        cache_error = e
    logger.debug("%s: not in the local cache (%s)", at, cache_error)
    if _offline():
        raise CheckpointError(
            f"not a local path, and hub id {at} is not in the local cache (HF_HUB_OFFLINE=1): "
            f"{type(cache_error).__name__}: {cache_error}"
        ) from cache_error
    logger.info("%s: downloading from the hub", at)
    try:
        path = fetch(False)
    except Exception as e:  # network, auth, missing repo: all end the load the same way
        raise CheckpointError(
            f"not a local path, hub id {at} is not in the local cache, and downloading it failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    return os.path.abspath(path)
