"""Filling an offload store with a checkpoint's tensors: each entry made once (a zero-copy
reference where no cast is needed, else a copy), reused by every later load.

Example::

    store = OffloadStore(offload_dir)
    entries, _ = ensure_entries(store, {p: index.tensors[p] for p in disk_params},
                                checkpoint=index.root, dtype="bfloat16")
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import replace

import torch

from .. import trace
from ..checkpoint.types import TensorMeta
from ..checkpoint.dtypes import cast_dtype, dtype_from_name
from ..io import PosixReader, Reader, ReadProgress
from .entry import Entry, EntrySpec, OffloadError, SourceId
from .store import OffloadStore

__all__ = ["ensure_entries", "bytes_to_write"]

_HEADER_ROOM = 4096  # an entry's header (generous)


def bytes_to_write(store: OffloadStore, specs: Mapping[str, EntrySpec]) -> int:
    """What making the missing entries of `specs` will write into `store`: a copy's bytes,
    a zero-copy reference's header only."""
    needed = 0
    for spec in {s.key: s for s in specs.values()}.values():
        if store.lookup(spec.key) is None:
            copy = not (store.zero_copy and spec.can_reference)
            needed += _HEADER_ROOM + (spec.nbytes if copy else 0)
    return needed


def ensure_entries(store: OffloadStore, metas: Mapping[str, TensorMeta], *, checkpoint: str | None = None,
                   dtype: str | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                   verify: bool = True, progress: ReadProgress | None = None,
                   reader: Reader | None = None) -> tuple[dict[str, Entry], int]:
    """Offload-store entries for tensors `metas` of the checkpoint whose root is
    `checkpoint` (keyed by any name, e.g. parameter names; a meta's `file` is relative to
    that root, or absolute) as `dtype` (None: their own;
    floating-point tensors only), recorded in the manifest under (`checkpoint`, `dtype`).
    An entry already there and intact is reused; one missing or corrupt is made from
    `tensors[name]` if given, else read from the checkpoint (one tensor at a time).
    Returns (name -> Entry, checkpoint bytes read). `progress` hears of those reads (see
    `distload.io.reader`); each entry is an ``offload entry`` span of `distload.trace`.
    `reader` reads them (`distload.io.Reader`; default: the POSIX reader of `checkpoint`,
    and `checkpoint` defaults to its `root`); a file the reader has no local path for is
    copied, never referenced.

    Example::

        store = OffloadStore(offload_dir)
        entries, _ = ensure_entries(store, {p: index.tensors[p] for p in disk_params},
                                    checkpoint=index.root, dtype="bfloat16")
    """
    if reader is None:
        reader = PosixReader(checkpoint)
    checkpoint = checkpoint if checkpoint is not None else reader.root
    specs = {}
    for name, meta in metas.items():
        local, cast = reader.local_path(meta.file), cast_dtype(meta.dtype, dtype)
        specs[name] = (EntrySpec.from_meta(replace(meta, file=local), cast) if local is not None else
                       EntrySpec.from_meta(meta, cast, source=SourceId(*reader.entry_source(meta.file))))
    needed, free = bytes_to_write(store, specs), shutil.disk_usage(store.root).free
    if needed > free:
        raise OffloadError(f"{store.root}: the disk tier needs {needed / 1e9:.2f} GB more here, "
                           f"but {free / 1e9:.2f} GB are free; free space there, choose another "
                           "--offload-dir, or give the device and cpu tiers more memory")
    store.register(checkpoint, dtype, sorted({s.key for s in specs.values()}))
    read = 0

    def produce(name: str) -> torch.Tensor:
        nonlocal read
        if tensors is not None and name in tensors:
            return tensors[name]
        meta, spec = metas[name], specs[name]
        read += meta.length
        out = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype))
        reader.read([meta], {meta.name: out}, workers=1, progress=progress)
        return out

    # Concurrent processes start at different places, so they write different entries at
    # once instead of queueing behind each other on the same one.
    order = sorted(specs, key=lambda n: specs[n].key)
    start = os.getpid() % len(order) if order else 0
    entries = {}
    for name in order[start:] + order[:start]:
        with trace.span("offload entry", "offload", tensor=name, bytes=specs[name].nbytes) as s:
            written = store.bytes_written
            entries[name] = store.ensure(specs[name], lambda n=name: produce(n), verify=verify)
            s.set(written=store.bytes_written - written)
    return entries, read
