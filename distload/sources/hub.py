"""Hub ids ``org/name[@revision]``: planned from the shards' headers alone, and on each
node only the shards its ranks read are downloaded, into that node's huggingface_hub cache
(``$HF_HOME``/``$HF_HUB_CACHE``; never distload's own cache).

Rank 0 resolves the revision to a commit once (`hub_index`); the plan records that commit,
the shards' sizes and the support files (config, tokenizer), and every node's leader
fetches exactly those files of exactly that commit with ``hf_hub_download`` (its cache
layout, its locks, its resumes), so a push mid-job cannot mix revisions and a second run
downloads nothing. ``HF_HUB_OFFLINE=1`` forbids every request: what the caches hold is
used, and anything missing is an error naming the file. ``HF_ENDPOINT`` and ``HF_TOKEN``
act as huggingface_hub reads them.

Example::

    source = HubSource("acme/llama@v1")
    index = source.index()                 # rank 0: headers by range requests
    wanted = source.node_files(["model-00002-of-00004.safetensors"])   # + config, tokenizer
    source.fetch(wanted, sizes={...})      # a node's leader
    source.root()                          # .../models--acme--llama/snapshots/<sha>
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ..checkpoint.index import CheckpointIndex
from ..errors import CheckpointError
from ..log import logger
from .base import Source, register_source
from .hub_index import download, remote_index, snapshot_dir
from .local import local_path
from .pool import thread_map

__all__ = ["HubSource", "resolve_model", "parse_hub_id", "HUB_PATTERNS"]

# What users download of a repo for a load (snapshot_download's allow_patterns): config,
# weights, tokenizer; never *.bin, *.pt, *.h5.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?")
_SHA = re.compile(r"[0-9a-f]{40}")
_MAX_DOWNLOADS = 8  # files at once per node, as snapshot_download's default


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


def resolve_model(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The absolute local path of checkpoint `spec`, for one process: an existing
    directory or `.safetensors`/`.bin` file as is; a hub id ``org/name[@revision]`` with
    every shard and support file brought into huggingface_hub's cache (see `HubSource`;
    `cache_dir` is distload's cache, which keeps the headers).

    Example::

        path = resolve_model("Qwen/Qwen2-0.5B")     # .../snapshots/<sha>
        idx = index_checkpoint(path)
    """
    spec = os.fspath(spec)
    local = local_path(spec)
    if local is not None:
        return local
    if parse_hub_id(spec) is None:
        raise CheckpointError(f"no such file or directory: {spec}")
    source = HubSource(spec, cache_dir=cache_dir)
    index = source.index()
    _, sizes = index.relative()
    source.fetch(source.node_files(sorted(sizes)), sizes=sizes)
    return source.root()


@register_source
class HubSource(Source):
    """`--model org/name[@revision]` (when no local path of that name exists)."""

    kind = "hub"
    fetches_files = True

    @classmethod
    def claims(cls, spec: str) -> bool:
        return parse_hub_id(spec) is not None

    def __init__(self, spec: str, **kw) -> None:
        super().__init__(spec, **kw)
        self.repo, self.revision = parse_hub_id(spec)
        self.commit: str | None = None          # rank 0 resolves it; the others take the plan's
        self.support: tuple[str, ...] = ()      # config, tokenizer: every node takes them

    def index(self) -> CheckpointIndex:
        remote = remote_index(self.repo, self.revision, cache_dir=self.cache_dir)
        self.commit, self.support = remote.sha, remote.support
        return remote.index

    def identity(self) -> dict:
        return {"kind": self.kind, "label": f"{self.repo}@{self.commit}", "repo": self.repo,
                "revision": self.commit, "support": list(self.support)}

    def check(self, identity: dict) -> None:
        if identity.get("kind") != self.kind or identity.get("repo") != self.repo:
            raise CheckpointError(f"this rank's --model {self.spec!r} is not {identity.get('label')}, "
                                  "which rank 0 planned: every rank must be given the same checkpoint")
        if self.revision and _SHA.fullmatch(self.revision) and self.revision != identity["revision"]:
            raise CheckpointError(f"this rank's --model {self.spec!r} names commit {self.revision}, but rank 0 "
                                  f"planned {identity.get('label')}: every rank must be given the same checkpoint")
        self.commit = identity["revision"]
        self.support = tuple(identity.get("support", ()))

    def node_files(self, reads: Sequence[str]) -> tuple[str, ...]:
        """The shards this node's ranks read, and the support files of the planned commit
        (config, tokenizer), so that every node's snapshot is a checkpoint directory."""
        return tuple(sorted(set(reads) | set(self.support)))

    def fetch(self, files: Sequence[str], *, sizes: Mapping[str, int] | None = None) -> int:
        """This node's leader: `files` (`node_files`) of the planned commit into this node's
        huggingface_hub cache, several at once; each shard's size checked against rank 0's
        listing. Returns the bytes downloaded (0 when the cache held everything). The first
        failure raises, naming its file."""
        from huggingface_hub import try_to_load_from_cache

        wanted = sorted(set(files))
        sizes = sizes or {}
        missing = [f for f in wanted
                   if not isinstance(try_to_load_from_cache(self.repo, f, revision=self.commit), str)]

        def one(file: str) -> None:
            path = download(self.repo, file, self.commit)
            want = sizes.get(file)
            size = os.path.getsize(path)
            if want is not None and size != want:
                raise CheckpointError(f"{path} is {size} bytes but {file} of {self.repo}@{self.commit} is "
                                      f"{want} bytes: a partial or corrupt download (delete it from the "
                                      "hub cache and run again)")

        if missing:
            logger.info("downloading %d file(s) of %s@%s on this node", len(missing), self.repo, self.commit)
        failures = [e for e in thread_map(_error_of(one), wanted, workers=_MAX_DOWNLOADS, name="distload-dl")
                    if e is not None]
        if failures:
            if len(failures) > 1:
                logger.error("%d more download(s) failed: %s", len(failures) - 1,
                             "; ".join(str(e) for e in failures[1:4]))
            raise failures[0]
        return sum(os.path.getsize(os.path.join(self.root(), f)) for f in missing)

    def verify(self, files: Sequence[str]) -> int:
        """Each of `files` against the digest the hub gives for it (the ETag
        huggingface_hub names its blob by: an LFS file's sha256)."""
        from .checksums import verify_hub_files

        return verify_hub_files(self.root(), files, label=f"{self.repo}@{self.commit}")

    def root(self) -> str:
        if self.commit is None:
            raise RuntimeError("HubSource.root() before index() or check(): the commit is not known yet")
        return snapshot_dir(self.repo, self.commit)


def _error_of(fn):
    """`fn` returning the exception it raised (None if none), so that every download of a
    batch runs to its end and the first failure in file order is the one reported."""
    def run(arg):
        try:
            fn(arg)
        except Exception as exc:  # noqa: BLE001
            return exc
        return None
    return run
