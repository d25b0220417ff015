"""The POSIX reader: a checkpoint in a directory of this node, read with coalesced
preads (`distload.io.reader`), optionally O_DIRECT, and on the CPU handed over as
copy-on-write views of its pages (`distload.io.mapped`).

Example::

    reader = PosixReader("/models/llama", ReadOptions(workers=4))
    stats = reader.read(plan.stage(rank).reads, storage)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ..checkpoint.types import TensorMeta
from ..errors import CheckpointError
from .base import Reader, ReadOptions
from .mapped import map_tensors
from .reader import read_tensors
from .stats import ReadProgress, ReadStats

__all__ = ["PosixReader"]


class PosixReader(Reader):
    """Reads files under `root` (this node's directory of the checkpoint)."""

    def __init__(self, root: str | os.PathLike, options: ReadOptions | None = None) -> None:
        super().__init__(options)
        self.root = os.fspath(root)

    def _located(self, reads: Sequence[TensorMeta]) -> list[TensorMeta]:
        return [m.located(self.root) for m in reads]

    def check(self, files: Sequence[str], sizes: Mapping[str, int]) -> None:
        for file in files:
            path = os.path.join(self.root, file)
            want = sizes.get(file)
            try:
                size = os.stat(path).st_size
            except OSError as e:
                raise CheckpointError(f"{path}: {e.strerror} (a file of the checkpoint rank 0 planned)") from None
            if want is not None and size != want:
                raise CheckpointError(f"{path} is {size} bytes on this node but {want} bytes on rank 0's: "
                                      "every node must see the same checkpoint")

    def map(self, reads: Sequence[TensorMeta], *, progress: ReadProgress | None = None
            ) -> tuple[dict[str, torch.Tensor], ReadStats]:
        # mapped pages are the page cache, which O_DIRECT is asked to skip
        if self.options.direct_io:
            return {}, ReadStats()
        return map_tensors(self._located(reads), progress=progress)

    def read(self, reads: Sequence[TensorMeta], dests: Mapping[str, torch.Tensor], *,
             progress: ReadProgress | None = None, workers: int | None = None) -> ReadStats:
        opts = self.options
        # a read of a few tensors (`workers` given: the offload store's) goes through the
        # page cache, as it always did; the stage's reads follow the options
        return read_tensors(self._located(reads), dests, workers=workers or opts.workers,
                            staging_bytes=opts.staging_bytes, direct_io=opts.direct_io and workers is None,
                            progress=progress)

    def entry_source(self, file: str) -> tuple[str, int, int]:
        real = os.path.realpath(os.path.join(self.root, file))
        st = os.stat(real)
        return real, st.st_size, st.st_mtime_ns

    def local_path(self, file: str) -> str | None:
        return os.path.join(self.root, file)

    def describe(self, file: str) -> str:
        return os.path.join(self.root, file)
