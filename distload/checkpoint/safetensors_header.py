"""Parsing and validating the JSON header of one `.safetensors` file.

Layout of the format: 8 bytes little-endian header length `n`, `n` bytes of UTF-8 JSON,
then the data area. Each JSON entry is ``{"dtype": "BF16", "shape": [..],
"data_offsets": [begin, end]}`` with offsets relative to the data area. Only the header is
read here, never the data: planning needs where each tensor lies, not its bytes.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from distload import trace
from distload.checkpoint.files import open_checkpoint_file
from distload.checkpoint.types import SAFETENSORS_DTYPES, TensorMeta
from .dtypes import dtype_name
from distload.errors import CheckpointError

__all__ = ["read_safetensors_header", "parse_safetensors_header", "read_header_bytes", "header_length",
           "MAX_HEADER_BYTES"]

# Same bound as the safetensors reader: a larger header means a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: str | os.PathLike) -> list[TensorMeta]:
    """Return the tensors of the safetensors file `path`, sorted by offset.

    Reads the 8-byte length and the JSON header only (two preads), validates every entry
    and turns relative data offsets into absolute file offsets. Raises `CheckpointError`
    naming the file (and the tensor) on anything malformed.

    Example::

        metas = read_safetensors_header("model.safetensors")
        with open(metas[0].file, "rb") as f:
            raw = os.pread(f.fileno(), metas[0].length, metas[0].offset)
    """
    return _read_header(path)[0]


def header_length(prefix: bytes, file_size: int, *, file: str) -> int:
    """The length of the header that the 8 bytes `prefix` (the start of `file`, a file of
    `file_size` bytes) announce: how many bytes past the first 8 to read (or to fetch with
    a range request). Raises `CheckpointError` for an absurd length, or one that runs past
    the file's end.

    Example::

        n = header_length(first_bytes[:8], size, file="model.safetensors")   # then read 8 + n
    """
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(
            f"{file}: file is {file_size} bytes, shorter than the 8-byte safetensors header length"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{file}: header length {n} is absurd (limit {MAX_HEADER_BYTES}); not a safetensors file?"
        )
    if 8 + n > file_size:
        raise CheckpointError(
            f"{file}: header length {n} runs past the end of the file ({file_size} bytes); truncated?"
        )
    return n


def parse_safetensors_header(data: bytes, file_size: int, *, file: str) -> tuple[list[TensorMeta], int]:
    """The tensors of a safetensors file from its first bytes alone: `data` holds at least
    the 8-byte length and the JSON header (more is ignored), `file_size` is the whole
    file's size, `file` names it in the metas and in errors. Returns the metas sorted by
    offset (absolute file offsets) and the header's size in the file (8 + n). The one
    validator of headers: a local file's (`read_safetensors_header`) and a remote one's
    (fetched by range requests, `distload.sources.hub_index`) go through it alike.

    Example::

        metas, header_size = parse_safetensors_header(first_bytes, size, file="model.safetensors")
    """
    n = header_length(data, file_size, file=file)
    if len(data) < 8 + n:
        raise CheckpointError(f"{file}: short read of header ({max(0, len(data) - 8)} of {n} bytes)")
    header = _parse_json(file, bytes(data[8:8 + n]))
    base = 8 + n
    data_size = file_size - base
    metas = [
        _entry_to_meta(file, name, entry, base, data_size)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    metas.sort(key=lambda m: (m.offset, m.length, m.name))
    _check_layout(file, metas, base, data_size)
    return metas, base


def _read_header(path: str | os.PathLike) -> tuple[list[TensorMeta], int]:
    """Like `read_safetensors_header`, also returning the header's size on disk (8 + n)."""
    file = os.path.abspath(os.fspath(path))
    with trace.span("header", "io", file=file) as span:
        data, size = read_header_bytes(file)
        span.set(bytes=len(data))
    return parse_safetensors_header(data, size, file=file)


def read_header_bytes(file: str) -> tuple[bytes, int]:
    """The first 8 + n bytes of the safetensors file `file` (its length and JSON header)
    and the file's size: two preads, whatever the file's size.

    Example::

        data, size = read_header_bytes("model.safetensors")
        metas, _ = parse_safetensors_header(data, size, file="model.safetensors")
    """
    fd, size = open_checkpoint_file(file, "reading its safetensors header")
    try:
        prefix = os.pread(fd, 8, 0)
        n = header_length(prefix, size, file=file)
        raw = os.pread(fd, n, 8)
        if len(raw) != n:  # the file shrank under us
            raise CheckpointError(f"{file}: short read of header ({len(raw)} of {n} bytes)")
        return prefix + raw, size
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read safetensors header: {e.strerror}") from e
    finally:
        os.close(fd)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads would silently keep the last of two same-named tensors.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(file: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except ValueError as e:  # JSONDecodeError is a ValueError, as is a duplicate key
        raise CheckpointError(f"{file}: header is not valid JSON: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{file}: header is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is a JSON {type(header).__name__}, not an object")
    return header


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a dim


def _torch_dtype(file: str, name: str, st_dtype: object) -> torch.dtype:
    if not isinstance(st_dtype, str):
        raise CheckpointError(f"{file}: tensor {name!r}: dtype must be a string, got {st_dtype!r}")
    dtype = SAFETENSORS_DTYPES.get(st_dtype)
    if dtype is not None:
        return dtype
    if st_dtype.startswith("F8_"):
        raise CheckpointError(
            f"{file}: tensor {name!r} has fp8 dtype {st_dtype!r}, which this torch "
            f"({torch.__version__}) does not support; upgrade torch"
        )
    raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {st_dtype!r}")


def _entry_to_meta(file: str, name: str, entry: object, base: int, data_size: int) -> TensorMeta:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry must be a JSON object, got {entry!r}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: entry lacks {', '.join(missing)}")
    dtype = _torch_dtype(file, name, entry["dtype"])
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise CheckpointError(
            f"{where}: data_offsets must be two non-negative ints, got {offsets!r}"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets begin {begin} > end {end}")
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] run past the data area "
            f"({data_size} bytes); truncated?"
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - begin:
        raise CheckpointError(
            f"{where}: shape {shape} of {entry['dtype']} needs {numel * dtype.itemsize} bytes, "
            f"but data_offsets span {end - begin}"
        )
    return TensorMeta(name, file, dtype_name(dtype), tuple(shape), base + begin, end - begin)


def _check_layout(file: str, metas: list[TensorMeta], base: int, data_size: int) -> None:
    """The tensors tile the data area: no overlap, no gap, nothing after the last one —
    what safetensors' own reader demands ("file not fully covered"). An empty tensor
    occupies no bytes and may sit anywhere. `metas` are sorted by offset."""
    cursor = base  # where the next tensor must begin
    last: TensorMeta | None = None
    for m in metas:
        if m.length == 0:
            continue
        if m.offset < cursor:
            raise CheckpointError(
                f"{file}: tensors {last.name!r} and {m.name!r} overlap "
                f"([{last.offset}, {last.offset + last.length}) and [{m.offset}, {m.offset + m.length}))"
            )
        if m.offset > cursor:
            raise CheckpointError(
                f"{file}: {m.offset - cursor} byte(s) before tensor {m.name!r} belong to no "
                "tensor; safetensors refuses such a file (the data area must be fully covered)")
        cursor, last = m.offset + m.length, m
    if cursor != base + data_size:
        raise CheckpointError(
            f"{file}: {base + data_size - cursor} byte(s) after the last tensor belong to no "
            "tensor; safetensors refuses such a file (the data area must be fully covered)")
