"""Opening checkpoint files for reading, with errors that name the file and why it was
needed; which files a checkpoint may use; tensors as writable bytes (no numpy needed).

The symlink policy: a checkpoint's file may be a symlink only to a file inside the
checkpoint's own directory tree — or, where the directory is a huggingface_hub snapshot
(``.../snapshots/<commit>``), inside that repository's ``blobs/``, where the hub cache
keeps every file. A link anywhere else is refused, as are directories, FIFOs, sockets and
devices where a file should be (a FIFO would block the reader forever).

Example::

    check_checkpoint_file("/models/llama", "model-00001-of-00002.safetensors")
    fd, size = open_checkpoint_file("model-00001-of-00002.safetensors", "its header")
    os.preadv(fd, [byte_view(tensor)], offset)
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import torch

from ..errors import CheckpointError

__all__ = ["missing_path_message", "open_checkpoint_file", "check_checkpoint_file", "file_kind", "byte_view",
           "FILE_CHUNK_BYTES"]

# Bytes per buffered write or hashing read of a whole file (checksums, offload entries):
# large enough for a disk's full speed, small enough that the buffer never matters.
FILE_CHUNK_BYTES = 16 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def missing_path_message(path: str) -> str:
    """Why `path` cannot be used as a checkpoint path: it does not exist, or it exists but
    this user cannot reach it (a directory on the way without search permission)."""
    try:
        os.stat(os.path.expanduser(path))
    except PermissionError:
        return f"permission denied: {path} (it exists, but this user may not read it or a directory above it)"
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot reach {path}: {exc.strerror}"
        return f"no such file or directory: {path}"
    return f"not a checkpoint file or directory: {path}"


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a directory", "a FIFO", ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_checkpoint_file(file: str, purpose: str) -> tuple[int, int]:
    """A read-only descriptor of the regular file `file` and its size in bytes; the caller
    closes it. A file that cannot be opened, or is no regular file, raises
    `CheckpointError` naming it and `purpose`."""
    try:  # non-blocking: opening a FIFO for reading would wait for a writer forever
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"cannot open {file} ({purpose}): {e.strerror}") from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise CheckpointError(f"cannot stat {file} ({purpose}): {e.strerror}") from e
    kind = file_kind(st.st_mode)
    if kind is not None:
        os.close(fd)
        raise CheckpointError(f"{file} is {kind}, not a file ({purpose})")
    return fd, st.st_size


def check_checkpoint_file(root: str, name: str, *, needed_for: str = "") -> None:
    """Raise `CheckpointError` unless `name` (relative to the checkpoint directory
    `root`) is a regular file that the symlink policy (module doc) allows."""
    path = os.path.join(root, name)
    why = f" ({needed_for})" if needed_for else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        link = os.path.islink(path)
        raise CheckpointError(f"{path} does not exist{why}" if not link else
                              f"{path} is a broken symlink to {os.readlink(path)}{why}") from None
    except OSError as e:
        raise CheckpointError(f"cannot stat {path}{why}: {e.strerror}") from e
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a file{why}")
    real, home = os.path.realpath(path), os.path.realpath(root)
    allowed = [home]
    snapshots = os.path.dirname(home)
    if os.path.basename(snapshots) == "snapshots":  # a hub cache: <repo>/snapshots/<commit>
        allowed.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    if not any(real == a or real.startswith(a + os.sep) for a in allowed):
        raise CheckpointError(f"{path} is a symlink to {real}, outside the checkpoint's directory"
                              f"{why}; copy the file in, or point --model at its directory")


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of the contiguous CPU tensor `t` (any dtype, pinned or not):
    the buffer `preadv`/`write` fill or send. The view keeps `t` alive (so a temporary
    such as ``byte_view(x.contiguous())`` is safe)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got one on {t.device}")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    array._tensor = t  # the memoryview holds `array`, which holds the tensor and its storage
    return memoryview(array).cast("B")
