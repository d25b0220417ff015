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

`ReadOptions` holds the options of every reader: node-local (they may differ between
ranks: the argument-agreement check skips them), reported per rank, and the CLI's flags
of the same names. A new reader is a module here (or a package of its own) and a source
whose `reader()` returns it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from ..checkpoint.types import TensorMeta
from .stats import ReadProgress, ReadStats

__all__ = ["Reader", "ReadOptions", "DEFAULT_STAGING_BYTES", "MIN_STAGING_BYTES", "DEFAULT_READ_WORKERS"]

DEFAULT_STAGING_BYTES = 16 << 20
MIN_STAGING_BYTES = 64 << 10
DEFAULT_READ_WORKERS = 2


def _option(default, flag: str):
    # `flag`: the CLI field (`distload.cli.config.RunConfig`) that sets this option
    return field(default=default, metadata={"flag": flag})


@dataclass(frozen=True)
class ReadOptions:
    """How one rank reads. Every field is node-local (may differ between ranks) and goes
    into the rank's report. `workers`: threads (or requests in flight) per rank;
    `staging_bytes`: bytes per read and per staging buffer; `direct_io`: O_DIRECT where
    the filesystem allows it (POSIX reader; no mapped pages then).

    Example::

        reader = open_source("./llama").reader(ReadOptions(workers=4, direct_io=True))
    """

    workers: int = _option(DEFAULT_READ_WORKERS, "read_workers")
    staging_bytes: int = _option(DEFAULT_STAGING_BYTES, "staging_size")
    direct_io: bool = _option(False, "direct_io")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"read_workers must be at least 1, got {self.workers}")
        if self.staging_bytes < MIN_STAGING_BYTES:
            raise ValueError(f"staging_bytes must be at least {MIN_STAGING_BYTES} (64KiB), got {self.staging_bytes}")

    @staticmethod
    def flags() -> tuple[str, ...]:
        """The CLI fields that set read options: node-local, so never compared between ranks."""
        return tuple(f.metadata["flag"] for f in fields(ReadOptions))

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
