"""Opening checkpoint files for reading, with errors that name the file and why it was
needed.

Example::

    fd, size = open_checkpoint_file("model-00001-of-00002.safetensors", "its header")
"""

from __future__ import annotations

import os

from ..errors import CheckpointError

__all__ = ["open_checkpoint_file"]


def open_checkpoint_file(file: str, purpose: str) -> tuple[int, int]:
    """A read-only descriptor of `file` and its size in bytes; the caller closes it. A file
    that cannot be opened raises `CheckpointError` naming it and `purpose`."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"cannot open {file} ({purpose}): {e.strerror}") from e
    try:
        return fd, os.fstat(fd).st_size
    except OSError as e:
        os.close(fd)
        raise CheckpointError(f"cannot stat {file} ({purpose}): {e.strerror}") from e
