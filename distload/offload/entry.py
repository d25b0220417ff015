"""One offload entry: what a stored tensor is, its content address, its checksum, and how
its bytes are written and read back.

An entry is a file ``data/<k[:2]>/<key>`` in the offload directory, itself a valid
safetensors file (so `safetensors.safe_open` reads it independently):

* a **copy** holds one tensor named ``"tensor"`` in the entry's dtype;
* a **reference** (zero-copy) holds no tensor: its metadata points at the byte range of
  the tensor in the source safetensors file, which needs no cast.

The header metadata carries the tensor's checkpoint name, dtype, shape, byte count, a
checksum of the bytes and the identity (path, size, mtime) of the source file. The key
hashes exactly what determines the bytes: the source's identity, the tensor name, the
target dtype and the shape; another dtype makes another entry, a rerun finds the same one.

Example::

    spec = EntrySpec.from_meta(meta, dtype="bfloat16")
    spec.key              # 64 hex digits
    entry.read()          # a CPU tensor, bit-exact
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass

import torch

from ..checkpoint.files import FILE_CHUNK_BYTES, byte_view, file_kind
from ..checkpoint.types import SAFETENSORS_DTYPES, TensorMeta
from ..checkpoint.dtypes import dtype_from_name, dtype_name
from ..errors import DistloadError

__all__ = ["ENTRY_FORMAT", "OffloadError", "SourceId", "EntrySpec", "Entry", "checksum_bytes",
           "checksum_file", "pread_exact", "open_regular", "not_regular"]

ENTRY_FORMAT = 1
KIND_COPY, KIND_REF = "copy", "ref"
_ALIGN = 64                             # data of a copy entry starts 64-byte aligned
_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class OffloadError(DistloadError):
    """The offload directory cannot be used: a lock timeout, a truncated or unreadable
    entry, an unknown manifest version. The message names the path at fault."""


@dataclass(frozen=True)
class SourceId:
    """The identity of a checkpoint file: its real path, size and modification time."""

    file: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "SourceId":
        real = os.path.realpath(os.fspath(path))
        st = os.stat(real)
        return cls(real, st.st_size, st.st_mtime_ns)

    def current(self) -> bool:
        """Whether the file is still there, unchanged. A remote object (a URL) cannot be
        checked from here: its version (an ETag) is in `file`, so a changed object gets
        other entries."""
        if "://" in self.file:
            return True
        try:
            return SourceId.of(self.file) == self
        except OSError:
            return False


@dataclass(frozen=True)
class EntrySpec:
    """What an entry must hold: tensor `name` of `source`, as `dtype` with `shape`.
    `offset`/`length`/`src_dtype` say where its bytes lie in the source (offset -1: not
    addressable, e.g. a pickled .bin checkpoint)."""

    source: SourceId
    name: str
    dtype: str
    shape: tuple[int, ...]
    src_dtype: str
    offset: int = -1
    length: int = 0

    @classmethod
    def from_meta(cls, meta: TensorMeta, dtype: str | None = None, *,
                  source: SourceId | None = None) -> "EntrySpec":
        """The spec of checkpoint tensor `meta` materialized as `dtype` (None: its own).
        `source`: the identity of a file that is not on this node (a reader's
        `entry_source`): its bytes can only be copied, never referenced."""
        if source is not None:
            return cls(source, meta.name, dtype or meta.dtype, tuple(meta.shape), meta.dtype, -1, meta.length)
        offset = meta.offset if meta.file.endswith(".safetensors") else -1
        return cls(SourceId.of(meta.file), meta.name, dtype or meta.dtype, tuple(meta.shape),
                   meta.dtype, offset, meta.length)

    @property
    def key(self) -> str:
        ident = [ENTRY_FORMAT, self.source.file, self.source.size, self.source.mtime_ns,
                 self.name, self.dtype, list(self.shape)]
        return hashlib.sha256(json.dumps(ident, separators=(",", ":")).encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        n = dtype_from_name(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def can_reference(self) -> bool:
        """Zero-copy is possible: the bytes sit in a safetensors file, already in `dtype`."""
        return self.offset >= 0 and self.dtype == self.src_dtype and self.length == self.nbytes


@dataclass(frozen=True)
class Entry:
    """A complete entry: where its bytes are (`path`, `offset`, `nbytes`) and what they are."""

    key: str
    kind: str
    path: str          # the entry file (copy) or the source file (reference)
    offset: int        # absolute offset of the bytes in `path`
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    checksum: str
    name: str
    source: SourceId
    entry_file: str    # the entry file itself (for a reference: its small header file)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read with `preadv` into `out` (any contiguous CPU tensor of
        `nbytes` bytes, e.g. pinned) or a new CPU tensor. Raises `OffloadError` when the
        file is shorter than the entry says."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.torch_dtype)
        if out.numel() * out.element_size() != self.nbytes or not out.is_contiguous():
            raise ValueError(f"buffer of {out.numel() * out.element_size()} bytes for entry "
                             f"{self.key[:12]} of {self.nbytes} bytes")
        if self.nbytes:
            fd = open_regular(self.path)
            try:
                pread_exact(fd, byte_view(out), self.offset, self.path)
            finally:
                os.close(fd)
        return out.view(self.torch_dtype).view(self.shape)

    def verify(self) -> str | None:
        """None if the entry is intact, else what is wrong (size or checksum)."""
        try:
            size = os.lstat(self.entry_file).st_size
            if self.kind == KIND_COPY and size != self.offset + self.nbytes:
                return f"size {size} != {self.offset + self.nbytes} bytes"
            if self.kind == KIND_REF and not self.source.current():
                return f"source {self.source.file} changed or is gone"
            got = checksum_file(self.path, self.offset, self.nbytes)
        except OffloadError as e:
            return str(e)
        except OSError as e:
            return f"unreadable: {e.strerror}"
        return None if got == self.checksum else f"checksum {got} != {self.checksum}"


# ------------------------------------------------------------------------- checksums

def checksum_bytes(data: memoryview | bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def checksum_file(path: str, offset: int, nbytes: int) -> str:
    crc, buf = 0, bytearray(min(FILE_CHUNK_BYTES, max(nbytes, 1)))
    view = memoryview(buf)
    fd = open_regular(path)
    try:
        done = 0
        while done < nbytes:
            n = min(len(buf), nbytes - done)
            pread_exact(fd, view[:n], offset + done, path)
            crc = zlib.crc32(view[:n], crc)
            done += n
    finally:
        os.close(fd)
    return f"crc32:{crc:08x}"


def pread_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` from `offset`; a short file raises `OffloadError`."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OffloadError(f"{path} ends at byte {offset}, before the entry's end: it was truncated")
        view, offset = view[n:], offset + n


# ------------------------------------------------------------------------- opening files

def not_regular(path: str | os.PathLike) -> str | None:
    """None when `path` is a regular file (or absent), else what it is, links not followed
    ("a symlink to X", "a FIFO", "a directory", ...)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symlink to {os.readlink(path)}"
        except OSError:
            return "a symlink"
    return file_kind(st.st_mode)


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file `path` (the caller closes it). Never
    follows a symlink in the last component (an entry may not point out of the store) and
    never blocks (a FIFO would wait for a writer forever): anything else raises
    `OffloadError` naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OffloadError(f"{path} is {not_regular(path) or 'a symlink'}: the offload store "
                               "never follows links") from None
        raise
    try:
        kind = file_kind(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        raise OffloadError(f"{path} is {kind}, not an offload entry file")
    return fd


# ------------------------------------------------------------------------- the file format

def encode_header(spec: EntrySpec, key: str, kind: str, checksum: str) -> bytes:
    """The safetensors header (length prefix included) of an entry."""
    meta = {"distload_offload": str(ENTRY_FORMAT), "kind": kind, "key": key, "name": spec.name,
            "dtype": spec.dtype, "shape": json.dumps(list(spec.shape)), "nbytes": str(spec.nbytes),
            "checksum": checksum, "source": json.dumps([spec.source.file, spec.source.size,
                                                        spec.source.mtime_ns])}
    header: dict = {"__metadata__": meta}
    if kind == KIND_COPY:
        header["tensor"] = {"dtype": _ST_NAME[dtype_from_name(spec.dtype)], "shape": list(spec.shape),
                            "data_offsets": [0, spec.nbytes]}
    else:
        meta["offset"] = str(spec.offset)
    text = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(text))) % _ALIGN
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text


def read_entry_file(path: str) -> Entry:
    """Parse an entry file's header; raises `OffloadError` when it is not an entry (or not
    a regular file: see `open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise OffloadError(f"{path} is not an offload entry (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 1 << 20:
            raise OffloadError(f"{path} is not an offload entry (header of {n} bytes)")
        raw = f.read(n)
    try:
        meta = json.loads(raw)["__metadata__"]
        if meta.get("distload_offload") != str(ENTRY_FORMAT):
            raise OffloadError(f"{path} has entry format {meta.get('distload_offload')!r}, "
                               f"expected {ENTRY_FORMAT}")
        src = SourceId(*json.loads(meta["source"]))
        kind = meta["kind"]
        path_, offset = (src.file, int(meta["offset"])) if kind == KIND_REF else (path, 8 + n)
        return Entry(key=meta["key"], kind=kind, path=path_, offset=offset, nbytes=int(meta["nbytes"]),
                     dtype=meta["dtype"], shape=tuple(json.loads(meta["shape"])),
                     checksum=meta["checksum"], name=meta["name"], source=src, entry_file=path)
    except (ValueError, KeyError, TypeError) as e:
        raise OffloadError(f"{path} has a malformed offload header: {e}") from None


def tensor_bytes(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` as a contiguous CPU tensor of `dtype` (cast and copied only where needed)."""
    t = t.detach()
    if t.device.type != "cpu" or dtype_name(t.dtype) != dtype:
        t = t.to("cpu", dtype_from_name(dtype))
    return t.contiguous()
