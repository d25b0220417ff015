"""Hub ids ``org/name[@revision]``: a snapshot in huggingface_hub's own cache
(``$HF_HOME``/``$HF_HUB_CACHE``), downloaded with huggingface_hub where it is missing.

Rank 0 resolves the revision to a commit once; the plan records that commit, and every
node fetches exactly that commit into its own cache, so a push mid-job cannot mix
revisions. The cache is tried first (no network), the network only where it is allowed
(``HF_HUB_OFFLINE=1`` forbids it).
"""

from __future__ import annotations

import os
import re

from ..checkpoint.index import CheckpointIndex, index_checkpoint
from ..errors import CheckpointError
from ..log import logger
from .base import Source, register_source
from .local import local_path

__all__ = ["HubSource", "resolve_model", "parse_hub_id", "HUB_PATTERNS"]

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


def resolve_model(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Return the absolute local path of checkpoint `spec`.

    `spec` is an existing directory or `.safetensors`/`.bin` file, or a hub id
    ``org/name`` or ``org/name@revision``. A hub id is looked up in the local cache first
    (no network); failing that it is downloaded (config, safetensors weights, tokenizer),
    unless ``HF_HUB_OFFLINE=1``. `cache_dir` is huggingface_hub's cache (default
    ``$HF_HUB_CACHE``, read now), never distload's.

    Example::

        path = resolve_model("Qwen/Qwen2-0.5B")     # .../snapshots/<sha>
        idx = index_checkpoint(path)
    """
    spec = os.fspath(spec)
    local = local_path(spec)
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


@register_source
class HubSource(Source):
    """`--model org/name[@revision]` (when no local path of that name exists)."""

    kind = "hub"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return parse_hub_id(spec) is not None

    def __init__(self, spec: str, **kw) -> None:
        super().__init__(spec, **kw)
        self.repo, self.revision = parse_hub_id(spec)
        self.commit: str | None = None   # rank 0 resolves it; the others take the plan's

    def index(self) -> CheckpointIndex:
        path = resolve_model(self.spec)
        self.commit = os.path.basename(path)   # .../snapshots/<commit sha>
        return index_checkpoint(path)

    def identity(self) -> dict:
        return {"kind": self.kind, "label": f"{self.repo}@{self.commit}", "repo": self.repo,
                "revision": self.commit}

    def check(self, identity: dict) -> None:
        if identity.get("kind") != self.kind or identity.get("repo") != self.repo:
            raise CheckpointError(f"this rank's --model {self.spec!r} is not {identity.get('label')}, "
                                  "which rank 0 planned: every rank must be given the same checkpoint")
        self.commit = identity["revision"]

    def fetch(self, files) -> int:
        resolve_model(f"{self.repo}@{self.commit}")
        return 0

    def root(self) -> str:
        return resolve_model(f"{self.repo}@{self.commit}")
