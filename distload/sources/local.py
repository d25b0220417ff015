"""A checkpoint on a file system this node sees: a directory, or one `.safetensors`,
`.bin` or `*.index.json` file. Every node must see the same files (a shared file system,
or a copy on each node); each rank checks the sizes of the files it reads against the
plan's."""

from __future__ import annotations

import os

from ..checkpoint.files import missing_path_message
from ..checkpoint.index import CheckpointIndex, index_checkpoint
from ..errors import CheckpointError
from .base import Source, register_source

__all__ = ["LocalSource", "local_path"]

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def local_path(spec: str) -> str | None:
    """The absolute path `spec` names on this machine if it exists, else None. An existing
    file that cannot be a checkpoint raises `CheckpointError`."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if not path.endswith(_CHECKPOINT_SUFFIXES):
            raise CheckpointError(f"{path}: not a checkpoint file "
                                  "(expected a directory, .safetensors, .bin, .pt, .pth or *.index.json)")
        return path
    if os.path.lexists(path):
        raise CheckpointError(f"{path}: exists but is neither a directory nor a regular file")
    return None


@register_source
class LocalSource(Source):
    """`--model /path/to/dir` (or a file in it)."""

    kind = "local"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return local_path(spec) is not None

    def __init__(self, spec: str, **kw) -> None:
        super().__init__(spec, **kw)
        path = local_path(spec)
        if path is None:
            raise CheckpointError(missing_path_message(spec))
        self.path = path

    def index(self) -> CheckpointIndex:
        return index_checkpoint(self.path)

    def identity(self) -> dict:
        return {"kind": self.kind, "label": os.path.basename(self.path.rstrip(os.sep)) or self.path}

    def root(self) -> str:
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
