"""The `Reader` seam (as PyTorch DCP's `StorageReader.read_data`): what executes a rank's
read items into their destinations, and the one declaration of its options.

A `Source` hands each rank a reader for its node (``source.reader(options)``); the loader,
the tiers and the offload store talk only to this interface, never to files. Who calls
what, on every rank, in order (`distload.loader.load_stage` does it):

1. ``reader.check(files, sizes)`` — the files this rank reads are there, as rank 0 saw them;
2. ``reader.map(reads, progress=...)`` — tensors it can hand over without a copy (pages of
   a local file); default: none;
3. ``reader.read(reads, dests, progress=...)`` — fill `dests` from the byte ranges of
   `reads` (`TensorMeta`s with files relative to the checkpoint's root);
4. for the disk tier: ``reader.entry_source(file)`` (the identity an offload entry records)
   and ``reader.local_path(file)`` (a file a zero-copy entry may reference, or None).

`ReadOptions` holds the options of every reader, each declared once (`read_option`):
node-local (they may differ between ranks: the argument-agreement check skips them),
reported per rank, and a CLI flag each (`distload.cli.config` derives them). A new
reader is a module here (or a package of its own) and a source whose `reader()` returns it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..checkpoint.types import TensorMeta
from .stats import ReadProgress, ReadStats

__all__ = ["Reader", "ReadOptions", "read_option", "DEFAULT_STAGING_BYTES", "MIN_STAGING_BYTES",
           "DEFAULT_READ_WORKERS"]

DEFAULT_STAGING_BYTES = 16 << 20
MIN_STAGING_BYTES = 64 << 10
DEFAULT_READ_WORKERS = 2


def read_option(default: Any, *, flag: str, help: str, parse: Callable[[str], Any] | None = None,
                metavar: str | None = None) -> Any:
    """Declare one `ReadOptions` field: its `default`, and its CLI flag ``--<flag>`` (dashes
    for underscores) with its `help` (`distload.cli.config` makes the flag). The flag's
    text becomes the value through `parse` (default: the type of `default`); a bool is a
    switch with a ``--no-`` form. Every read option is node-local: never compared between
    ranks, reported per rank.

    Example (a new option is this one line in `ReadOptions`, or in a subclass)::

        queue_depth: int = read_option(32, flag="io_queue_depth", help="requests in flight per file")
    """
    return field(default=default, metadata={"flag": flag, "help": help, "parse": parse, "metavar": metavar})


def _size(text: str) -> int:
    from ..plan.budget import parse_size   # not at import: `plan` imports `io`

    return parse_size(text)


@dataclass(frozen=True)
class ReadOptions:
    """How one rank reads: the one declaration of the readers' options (`read_option`).
    Every field is node-local (may differ between ranks), goes into the rank's report, and
    is a flag of ``python -m distload.load``. `workers`: threads (or requests in flight)
    per rank; `staging_bytes`: bytes per read and per staging buffer; `direct_io`:
    O_DIRECT where the filesystem allows it (POSIX reader; no mapped pages then).

    Example::

        reader = open_source("./llama").reader(ReadOptions(workers=4, direct_io=True))
    """

    workers: int = read_option(DEFAULT_READ_WORKERS, flag="read_workers", metavar="N",
                               help=f"reader threads (or requests in flight) per rank (default {DEFAULT_READ_WORKERS})")
    staging_bytes: int = read_option(
        DEFAULT_STAGING_BYTES, flag="staging_size", parse=_size, metavar="SIZE",
        help=f"bytes per read and per staging buffer (pinned, two per reader thread on CUDA), e.g. "
             f"{DEFAULT_STAGING_BYTES >> 20}MiB (default), at least {MIN_STAGING_BYTES >> 10}KiB")
    direct_io: bool = read_option(False, flag="direct_io",
                                  help="read with O_DIRECT where the filesystem allows it (no page cache: for "
                                       "cold loads; CPU ranks then read instead of mapping pages)")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"read_workers (--read-workers) must be at least 1, got {self.workers}")
        if self.staging_bytes < MIN_STAGING_BYTES:
            raise ValueError(f"staging_bytes (--staging-size) must be at least {MIN_STAGING_BYTES >> 10}KiB, "
                             f"got {self.staging_bytes}")

    @classmethod
    def flags(cls) -> tuple[str, ...]:
        """The CLI names of the read options (``read_workers`` for ``--read-workers``)."""
        return tuple(f.metadata["flag"] for f in fields(cls))

    def report(self) -> dict:
        """The rank report's ``read_options``."""
        return asdict(self)


class Reader(ABC):
    """Executes read items of one checkpoint on one rank's node (see the module doc).
    Methods may be called from one thread at a time; `read` may use its own threads, and
    calls `progress(file, nbytes)` from them."""

    # the prefix of the file names `progress` hears (a local root), stripped in reports
    root: str = ""

    def __init__(self, options: ReadOptions | None = None) -> None:
        self.options = options or ReadOptions()

    def check(self, files: Sequence[str], sizes: Mapping[str, int]) -> None:
        """Raise `CheckpointError` naming the file if one of `files` is missing or its
        size is not `sizes[file]`. Default: nothing checked here (`read` checks)."""

    def map(self, reads: Sequence[TensorMeta], *, progress: ReadProgress | None = None
            ) -> tuple[dict[str, torch.Tensor], ReadStats]:
        """Tensors of `reads` handed over without a copy; default: none."""
        return {}, ReadStats()

    @abstractmethod
    def read(self, reads: Sequence[TensorMeta], dests: Mapping[str, torch.Tensor], *,
             progress: ReadProgress | None = None, workers: int | None = None) -> ReadStats:
        """Fill ``dests[meta.name]`` with the bytes of every meta in `reads` (cast to the
        destination's dtype where it differs; floating point only). `workers` overrides
        the options' (1: one tensor at a time, as the offload store reads). Raises
        `CheckpointError` naming the file on a missing, short or changed file."""

    @abstractmethod
    def entry_source(self, file: str) -> tuple[str, int, int]:
        """What an offload entry of `file` records of it (`distload.offload.SourceId`:
        identity, size, version): an entry is stale once the file's differ."""

    def local_path(self, file: str) -> str | None:
        """A path on this node holding `file`'s bytes (zero-copy offload entries reference
        it), or None where there is none."""
        return None

    def describe(self, file: str) -> str:
        """`file` as messages name it."""
        return file
