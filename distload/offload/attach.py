"""Making a loaded stage's CPU and disk tiers real.

Every rank calls these during `distload.load`, in this order::

    tiers = key_tiers(plan, rank, device)                          # before allocating
    storage = allocate_stage(plan, rank, module, device, tiers=tiers)
    read_stage(...); exchange_tied(...)                            # disk-tier keys skipped
    result = attach(plan, rank, module, storage, device, offload_dir)
    finish_stage(module, device, offloaded=result.params)

Disk-tier tensors are never allocated on the device: each becomes an offload-store entry
(a zero-copy reference into the source safetensors file when no cast is needed, else a
copy written once) and is streamed from there. CPU-tier tensors (on a CUDA rank) are read
into pinned host memory and streamed from it. On a CPU rank the CPU tier *is* the device.

Example::

    result = attach(plan, 0, module, storage, torch.device("cpu"), "/scratch/offload")
    result.report_fields()   # {"offloaded_bytes": ..., "offload_bytes_written": 0, ...}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint.types import TensorMeta, dtype_from_name
from ..io.reader import read_tensors
from ..plan.types import LoadPlan, Tier
from .entry import Entry, EntrySpec, OffloadError
from .store import OffloadStore, default_offload_dir
from .stream import Streamer, attach_streaming

__all__ = ["key_tiers", "OffloadResult", "attach", "ensure_entries"]

_RESIDENCY = {Tier.DEVICE: 0, Tier.CPU: 1, Tier.DISK: 2}


def _unit_of(param: str, units: tuple[str, ...]) -> str:
    return max((u for u in units if param.startswith(u + ".")), key=len)


def _home_tiers(plan: LoadPlan, rank: int, device: torch.device) -> dict[str, str]:
    """key -> where it lives while the model runs: the most resident tier of the units
    that use it on this stage (a tensor tied to a device unit stays on the device)."""
    stage = plan.stage(rank)
    unit_tier = dict(zip(stage.units, stage.unit_tiers))
    homes: dict[str, str] = {}
    for src in stage.params:
        tier = unit_tier[_unit_of(src.param, stage.units)]
        if tier == Tier.CPU and device.type != "cuda":
            tier = Tier.DEVICE   # host memory is the device's memory
        homes[src.key] = min(homes.get(src.key, tier), tier, key=_RESIDENCY.__getitem__)
    return homes


def key_tiers(plan: LoadPlan, rank: int, device: torch.device | str) -> dict[str, str]:
    """Where `allocate_stage` puts each checkpoint key of `rank`'s stage: ``disk`` keys are
    not allocated (they stay on meta), ``cpu`` keys go to pinned host memory, the others
    to the device. Tied tensors sent to or received from other ranks get device storage
    for the exchange, and `attach` moves them to their tier after it."""
    device = torch.device(device)
    stage = plan.stage(rank)
    exchanged = {k for k, _ in stage.sends} | {p.key for p in stage.params if p.src_rank != rank}
    return {k: (Tier.DEVICE if k in exchanged else t) for k, t in _home_tiers(plan, rank, device).items()}


@dataclass
class OffloadResult:
    """What `attach` did on one rank."""

    streamer: Streamer | None = None
    params: frozenset[str] = frozenset()      # parameters on meta between their unit's uses
    tier_bytes: dict[str, int] = field(default_factory=dict)   # plan bytes per tier
    bytes_read: int = 0                       # checkpoint bytes read to make entries
    bytes_written: int = 0                    # bytes written to the offload directory
    repaired: int = 0                         # corrupt entries found and rewritten
    offload_dir: str | None = None

    def report_fields(self) -> dict:
        """The rank report's offload figures."""
        return {"offloaded_bytes": self.tier_bytes.get(Tier.CPU, 0) + self.tier_bytes.get(Tier.DISK, 0),
                "offloaded_bytes_by_tier": {t: self.tier_bytes.get(t, 0) for t in (Tier.CPU, Tier.DISK)},
                "offload_bytes_written": self.bytes_written, "offload_wait_seconds": 0.0}

    def bind_report(self, report: dict) -> None:
        """Keep ``report["offload_wait_seconds"]`` current as forwards run."""
        if self.streamer is not None:
            self.streamer.bind_report(report)


def ensure_entries(store: OffloadStore, metas: Mapping[str, TensorMeta], *, checkpoint: str,
                   dtype: str | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                   verify: bool = True) -> tuple[dict[str, Entry], int]:
    """Offload-store entries for checkpoint tensors `metas` (keyed by any name, e.g.
    parameter names) as `dtype` (None: their own), recorded in the manifest under
    (`checkpoint`, `dtype`). An entry already there and intact is reused; one missing or
    corrupt is made from `tensors[name]` if given, else read from the checkpoint (one
    tensor at a time). Returns (name -> Entry, checkpoint bytes read).

    Example::

        store = OffloadStore(offload_dir)
        entries, _ = ensure_entries(store, {p: index.tensors[p] for p in disk_params},
                                    checkpoint=index.root, dtype="bfloat16")
    """
    specs = {name: EntrySpec.from_meta(meta, dtype if dtype_from_name(meta.dtype).is_floating_point
                                       else None) for name, meta in metas.items()}
    store.register(checkpoint, dtype, sorted({s.key for s in specs.values()}))
    read = 0

    def produce(name: str) -> torch.Tensor:
        nonlocal read
        if tensors is not None and name in tensors:
            return tensors[name]
        meta, spec = metas[name], specs[name]
        read += meta.length
        if not meta.file.endswith(".safetensors"):
            from ..checkpoint import load_bin_tensors

            return load_bin_tensors(meta.file, [meta.name])[meta.name]
        out = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype))
        read_tensors([meta], {meta.name: out}, workers=1)
        return out

    # Concurrent processes start at different places, so they write different entries at
    # once instead of queueing behind each other on the same one.
    order = sorted(specs, key=lambda n: specs[n].key)
    start = os.getpid() % len(order) if order else 0
    entries = {}
    for name in order[start:] + order[:start]:
        entries[name] = store.ensure(specs[name], lambda n=name: produce(n), verify=verify)
    return entries, read


def attach(plan: LoadPlan, rank: int, module: nn.Module, storage: dict[str, torch.Tensor],
           device: torch.device | str, offload_dir: str | os.PathLike | None = None, *,
           cache_dir: str | None = None, prefetch: bool = True, max_resident: int = 2,
           verify: bool = True, timeout: float = 600.0) -> OffloadResult:
    """Give `rank`'s offloaded units their tiers and stream them (see the module doc).
    `storage` is `allocate_stage`'s key -> tensor map; keys moved off the device are
    removed from it. `offload_dir` defaults to `default_offload_dir(cache_dir)`; it is
    only touched when the stage has disk-tier units. `verify` checksums reused entries."""
    device = torch.device(device)
    stage = plan.stage(rank)
    result = OffloadResult(tier_bytes=stage.tier_bytes(plan.unit_bytes))
    homes = _home_tiers(plan, rank, device)
    moved = {k for k, t in homes.items() if t != Tier.DEVICE}
    if not moved:
        return result
    metas = {m.name: m for s in plan.stages for m in s.reads}
    disk = sorted(k for k in moved if homes[k] == Tier.DISK)
    entries: dict[str, Entry] = {}
    if disk:
        store = OffloadStore(offload_dir or default_offload_dir(cache_dir), timeout=timeout)
        dtypes = {src.key: src.dtype for src in stage.params}
        entries, result.bytes_read = ensure_entries(
            store, {k: metas[k] for k in disk}, checkpoint=plan.checkpoint, dtype=plan.dtype,
            tensors={k: storage[k] for k in disk if k in storage}, verify=verify)
        for k, e in entries.items():
            if e.dtype != dtypes[k]:
                raise OffloadError(f"offload entry {e.key[:12]} for {k} holds {e.dtype}; "
                                   f"the plan wants {dtypes[k]}")
        result.bytes_written, result.repaired = store.bytes_written, store.repaired
        result.offload_dir = str(store.root)
    host = {k: _to_host(storage[k], device) for k in moved if homes[k] == Tier.CPU}
    source: dict[str, torch.Tensor | Entry] = {}
    for src in stage.params:
        if src.key in moved:
            source[src.param] = entries[src.key] if src.key in entries else host[src.key]
    for k in moved:
        storage.pop(k, None)   # device copies (of exchanged tensors) go with their params
    units = [u for u in stage.units if any(p.startswith(u + ".") for p in source)]
    result.streamer = attach_streaming(module, units, source, device, prefetch=prefetch,
                                       max_resident=max_resident)
    result.params = frozenset(source)
    return result


def _to_host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    return t.to("cpu").pin_memory() if device.type == "cuda" else t.to("cpu")
