"""The `Source` seam: one subclass per kind of storage a checkpoint can come from, as
PyTorch DCP has one `StorageReader` per storage.

Who calls what, in order (`distload.loader` does it):

1. every rank: ``source = open_source(spec, cache_dir=...)`` — picks the first registered
   source that claims `spec`; no I/O;
2. rank 0: ``source.index()`` — headers and config, no tensor data; the plan records
   ``source.identity()`` (JSON, no path of rank 0's machine);
3. every rank: ``source.check(plan.source)`` — the rank's own `spec` names the same
   checkpoint;
4. one rank per node: ``wanted = source.node_files(reads)`` — the source decides which
   files the node must bring in for `reads` (the files its ranks read, relative to the
   root): a download, the demo checkpoint made, or nothing; then, if any,
   ``source.fetch(wanted, sizes=plan.file_sizes)`` brings them; every other rank waits
   for every node's leader, without a time limit while they live (a download may take
   far longer than the process group's timeout: `distload.loader.fetch` coordinates);
5. with ``--verify-checksums``, the node's leader after `fetch`: ``source.verify(files)``
   — each file's digest against one this node did not compute from the same bytes
   (`distload.sources.checksums`);
6. every rank: ``source.reader(options)`` — the `distload.io.Reader` that executes this
   rank's read items on its node (default: the POSIX reader of ``source.root()``, the
   directory on this node that the plan's relative file names are joined to).

A new source is a new file (or package) with a `Source` subclass and one
`register_source` line; a source whose bytes are not local files returns its own reader.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

from ..checkpoint.files import missing_path_message
from ..checkpoint.index import CheckpointIndex
from ..errors import CheckpointError
from ..io import PosixReader, Reader, ReadOptions

__all__ = ["Source", "register_source", "open_source", "registered_sources"]


class Source(ABC):
    """Where one checkpoint lives. `spec` is what the user passed as `--model`;
    `cache_dir` is distload's own cache root (`distload.sources.cache`)."""

    kind: ClassVar[str]
    # Whether `fetch` brings files in (a download per node): the planner then prefers,
    # among equally good splits, the one whose stages touch the fewest files.
    fetches_files: ClassVar[bool] = False

    def __init__(self, spec: str, *, cache_dir: str | os.PathLike | None = None) -> None:
        self.spec, self.cache_dir = spec, cache_dir

    @classmethod
    @abstractmethod
    def claims(cls, spec: str) -> bool:
        """Whether this source serves `spec` (cheap: no network, no reading)."""

    @abstractmethod
    def index(self) -> CheckpointIndex:
        """Rank 0: every tensor's place and the config, from headers alone."""

    @abstractmethod
    def identity(self) -> dict:
        """What the plan records of this checkpoint: ``{"kind", "label", ...}``, JSON,
        with no absolute path (`label` is for people: logs, --explain, reports; `check`
        compares the rest)."""

    def check(self, identity: dict) -> None:
        """Every rank: raise `CheckpointError` if this rank's `spec` names another
        checkpoint than rank 0 planned (`identity` is the plan's)."""
        mine = {k: v for k, v in self.identity().items() if k != "label"}
        if mine != {k: v for k, v in identity.items() if k != "label"}:
            raise CheckpointError(f"this rank's --model {self.spec!r} is {mine}, but rank 0 planned "
                                  f"{identity}: every rank must be given the same checkpoint")

    def node_files(self, reads: Sequence[str]) -> tuple[str, ...]:
        """One rank per node: the files (relative to the root) this node must bring in,
        with `fetch`, before its ranks read `reads` (the files they read). A decision
        only: no I/O. Default: none — the files are where `root` says (a path every node
        sees) or are read in place (an object store).

        Example::

            HubSource("acme/llama").node_files(["model-00002-of-00004.safetensors"])
            # (the shard, plus config.json and the tokenizer files of the planned commit)
        """
        return ()

    def fetch(self, files: Sequence[str], *, sizes: Mapping[str, int] | None = None) -> int:
        """One rank per node: make `files` (what `node_files` chose; `sizes`: each file's
        size as rank 0 saw it) present on this node; returns the bytes this call brought
        in (downloaded or made). Default: nothing to do."""
        return 0

    @abstractmethod
    def root(self) -> str:
        """The checkpoint's directory on this node (after `fetch`); for a source with no
        local files, the location its reader's progress and messages name."""

    def reader(self, options: ReadOptions | None = None) -> Reader:
        """Every rank, after `fetch`: the reader of this node's copy of the checkpoint
        (`options`: this rank's, node-local)."""
        return PosixReader(self.root(), options)

    def verify(self, files: Sequence[str]) -> int:
        """One rank per node, after `fetch`: raise `CheckpointError` naming the first of
        `files` whose content differs from its recorded digest. Default: a manifest of
        sha256 digests in distload's cache, written on first use. Returns how many files
        were checked against a digest recorded before."""
        from .checksums import verify_local_files

        return verify_local_files(self.root(), files, cache_dir=self.cache_dir)


_SOURCES: list[type[Source]] = []


def register_source(cls: type[Source]) -> type[Source]:
    """Add `cls` to the sources `open_source` tries, after those registered before it."""
    _SOURCES.append(cls)
    return cls


def registered_sources() -> tuple[type[Source], ...]:
    return tuple(_SOURCES)


def open_source(spec: str, *, cache_dir: str | os.PathLike | None = None) -> Source:
    """The source of `spec` (``"demo"``, a local path, a hub id ``org/name[@rev]``): the
    first registered one that claims it. Raises `CheckpointError` when none does.

    Example::

        source = open_source("./llama")
        index = source.index()
    """
    if not isinstance(spec, str):
        raise CheckpointError(f"--model must be a path, a hub id or 'demo', not {type(spec).__name__}")
    for cls in _SOURCES:
        if cls.claims(spec):
            return cls(spec, cache_dir=cache_dir)
    message = missing_path_message(spec)
    hint = " (nor a hub id like org/name)" if message.startswith("no such") else ""
    raise CheckpointError(message + hint)
