"""Opening checkpoint files for reading, with errors that name the file and why it was
needed; tensors as writable bytes (no numpy needed).

Example::

    fd, size = open_checkpoint_file("model-00001-of-00002.safetensors", "its header")
    os.preadv(fd, [byte_view(tensor)], offset)
"""

from __future__ import annotations

import ctypes
import os

import torch

from ..errors import CheckpointError

__all__ = ["open_checkpoint_file", "byte_view"]


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


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of the contiguous CPU tensor `t` (any dtype, pinned or not):
    the buffer `preadv`/`write` fill or send. The caller keeps `t` alive while it uses
    the view."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got one on {t.device}")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")
