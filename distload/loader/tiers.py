"""Making a loaded stage's CPU and disk tiers real, as the plan's `ParamSource.tier` says.

Disk-tier tensors are never allocated on the device: each becomes an entry of the node's
offload store (a zero-copy reference into the source safetensors file when no cast is
needed, else a copy written once) and is streamed from there. CPU-tier tensors (on a
CUDA rank) are read into one pinned arena (`distload.io.pinned`) and streamed from it; a
tied one that the exchange put on the device is copied once into a pinned arena of the
tied tensors. On a CPU rank the CPU tier *is* the device.

Every rank calls `attach_tiers` during the load, after its reads and the tied exchange::

    result = attach_tiers(plan, rank, module, storage, device, reader=reader,
                          offload_dir="/scratch/offload")
    finish_stage(module, device, offloaded=result.params)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..dist import DEFAULT_TIMEOUT_S
from ..checkpoint.dtypes import cast_dtype, dtype_from_name
from ..io import Reader, ReadProgress
from ..io.pinned import HostArena, arena_layout
from ..offload import Entry, OffloadError, OffloadStore, Streamer, attach_streaming, default_offload_dir
from ..offload import ensure_entries
from ..plan.types import LoadPlan, Tier
from .decode import DecodedOnDemand

__all__ = ["OffloadResult", "attach_tiers"]


@dataclass
class OffloadResult:
    """What `attach_tiers` did on one rank."""

    streamer: Streamer | None = None
    params: frozenset[str] = frozenset()      # parameters on meta between their unit's uses
    tier_bytes: dict[str, int] = field(default_factory=dict)   # plan bytes per tier
    bytes_read: int = 0                       # checkpoint bytes read to make entries
    bytes_written: int = 0                    # bytes written to the offload directory
    repaired: int = 0                         # corrupt entries found and rewritten
    offload_dir: str | None = None
    pinned_bytes: int = 0                     # page-locked host memory (CUDA): tier + staging

    def report_fields(self) -> dict:
        """The rank report's offload figures."""
        return {"offloaded_bytes": self.tier_bytes.get(Tier.CPU, 0) + self.tier_bytes.get(Tier.DISK, 0),
                "offloaded_bytes_by_tier": {t: self.tier_bytes.get(t, 0) for t in (Tier.CPU, Tier.DISK)},
                "offload_bytes_written": self.bytes_written, "offload_wait_seconds": 0.0,
                "pinned_bytes": self.pinned_bytes}

    def bind_report(self, report: dict) -> None:
        """Keep ``report["offload_wait_seconds"]`` current as forwards run."""
        if self.streamer is not None:
            self.streamer.bind_report(report)


def _homes(plan: LoadPlan, rank: int, device: torch.device) -> dict[str, str]:
    """key -> the tier it lives on while the model runs (the CPU tier of a CPU device is
    the device itself)."""
    return {p.key: (Tier.DEVICE if p.tier == Tier.CPU and device.type != "cuda" else p.tier)
            for p in plan.stage(rank).params}


def attach_tiers(plan: LoadPlan, rank: int, module: nn.Module, storage: dict[str, torch.Tensor],
                 device: torch.device | str, *, reader: Reader, offload_dir: str | os.PathLike | None = None,
                 cache_dir: str | None = None,
                 prefetch: bool | None = None, max_resident: int | None = None, verify: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S, progress: ReadProgress | None = None) -> OffloadResult:
    """Give `rank`'s offloaded parameters their tiers and stream them (see the module
    doc). `storage` is `allocate_stage`'s key -> tensor map; keys moved off the device are
    removed from it. `reader` (the rank's, `distload.io.Reader`) reads what the offload
    store must copy. `offload_dir` defaults to `default_offload_dir(cache_dir)`; it is only touched
    when the stage has disk-tier parameters. `verify` checksums reused entries.
    `max_resident` and `prefetch` default to the plan's streaming slots for this stage
    (2: one unit runs while the next is fetched; 1: no prefetch — the device room the
    planner kept holds one streamed unit). `timeout_s` bounds the wait for another
    process's lock on an entry; `progress` hears of the checkpoint bytes read to make
    entries."""
    device = torch.device(device)
    stage = plan.stage(rank)
    result = OffloadResult(tier_bytes=stage.tier_bytes(plan.unit_bytes))
    homes = _homes(plan, rank, device)
    moved = {k for k, t in homes.items() if t != Tier.DEVICE}
    if not moved:
        return result
    # A tied tensor received from another rank is in that rank's reads, not this one's.
    located = {m.name: m for s in plan.stages for m in s.reads}
    disk = sorted(k for k in moved if homes[k] == Tier.DISK)
    # A disk-tier weight of a quantized checkpoint: its entry is the decoded tensor, made
    # (its parts read and decoded, one weight at a time) only where the store lacks it.
    decoded = {}
    for src in stage.params:
        if src.key in disk and src.key in stage.decode and src.key not in decoded:
            shape = tuple(module.get_parameter(src.param).shape)
            decoded[src.key] = (shape, src.dtype)
            first = located[stage.decode[src.key]["parts"][0]]
            located[src.key] = replace(first, name=src.key, dtype=src.dtype, shape=shape, offset=-1,
                                       length=math.prod(shape) * dtype_from_name(src.dtype).itemsize)
    entries: dict[str, Entry] = {}
    if disk:
        store = OffloadStore(offload_dir or default_offload_dir(cache_dir), timeout_s=timeout_s)
        dtypes = {src.key: src.dtype for src in stage.params}
        tensors = DecodedOnDemand({k: storage[k] for k in disk if k in storage}, decoded, stage.decode,
                                  located, reader=reader, progress=progress)
        # One group per cast: a plan's dtype, or each parameter's own (a device map's plan,
        # a parameter its family keeps in float32)
        casts: dict[str | None, list[str]] = {}
        for k in disk:
            cast = plan.dtype if dtypes[k] == cast_dtype(located[k].dtype, plan.dtype) else dtypes[k]
            casts.setdefault(cast, []).append(k)
        for cast, keys in sorted(casts.items(), key=lambda kv: str(kv[0])):
            made, nread = ensure_entries(
                store, {k: located[k] for k in keys}, reader=reader, dtype=cast,
                tensors=tensors, verify=verify, progress=progress)
            entries.update(made)
            result.bytes_read += nread
        result.bytes_read += tensors.bytes_read
        for k, e in entries.items():
            if e.dtype != dtypes[k]:
                raise OffloadError(f"offload entry {e.key[:12]} for {k} holds {e.dtype}; "
                                   f"the plan wants {dtypes[k]}")
        result.bytes_written, result.repaired = store.bytes_written, store.repaired
        result.offload_dir = str(store.root)
    host, copied, copied_pinned = _to_host({k: storage[k] for k in moved if homes[k] == Tier.CPU},
                                           device)
    source: dict[str, torch.Tensor | Entry] = {}
    for src in stage.params:
        if src.key in moved:
            source[src.param] = entries[src.key] if src.key in entries else host[src.key]
    for k in moved:
        storage.pop(k, None)   # device copies (of exchanged tensors) go with their params
    units = [u for u in stage.units if u and any(p.startswith(u + ".") for p in source)]
    if "" in stage.units and any(not any(p.startswith(u + ".") for u in units) for p in source):
        units = [""]   # the model itself streams (a device map's preloaded root): all of it at once
    slots = stage.stream_slots or 2   # a plan without slots (older) streamed with two
    max_resident = slots if max_resident is None else max_resident
    prefetch = max_resident > 1 if prefetch is None else prefetch
    result.streamer = attach_streaming(module, units, source, device, prefetch=prefetch,
                                       max_resident=max_resident)
    result.params = frozenset(source)
    if device.type == "cuda":  # the arena `allocate_stage` made, the one made here, staging
        in_arena = {k: _nbytes(t) for k, t in host.items() if k not in copied}
        result.pinned_bytes = (arena_layout(in_arena)[1] + copied_pinned
                               + result.streamer.pinned_bytes)
    return result


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _to_host(tensors: dict[str, torch.Tensor], device: torch.device
             ) -> tuple[dict[str, torch.Tensor], set[str], int]:
    """The CPU tier's tensors in host memory, the keys copied there here, and the pinned
    bytes taken for them. Those still on the device (tied tensors, exchanged there) are
    copied once into one pinned arena of their own (not `.to("cpu").pin_memory()`: a
    second copy, and the caching host allocator's power-of-two rounding)."""
    on_device = {k: t for k, t in tensors.items() if t.device.type != "cpu"}
    if not on_device:
        return tensors, set(), 0
    if device.type != "cuda":
        return {**tensors, **{k: t.to("cpu") for k, t in on_device.items()}}, set(on_device), 0
    arena = HostArena({k: _nbytes(t) for k, t in on_device.items()})
    out = dict(tensors)
    for k, t in on_device.items():
        out[k] = arena.view(k, t.shape, t.dtype)
        out[k].copy_(t)
    return out, set(on_device), arena.nbytes
