"""Materialize one rank's stage from the plan: allocate its parameters on the rank's
device, read its byte ranges, exchange tied tensors, and check nothing is left on meta.

Called by every rank, after the plan broadcast, in this order:
`allocate_stage` → `read_stage` → (agree) → `exchange_tied` → `finish_stage`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint.types import dtype_from_name
from .errors import LoadError
from .io.mapped import map_tensors
from .io.reader import ReadStats, read_tensors
from .plan.types import LoadPlan, Tier

__all__ = ["map_stage", "allocate_stage", "read_stage", "exchange_tied", "finish_stage"]


def map_stage(plan: LoadPlan, rank: int, device: torch.device, *,
               tiers: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """On the CPU, this rank's own device-tier tensors that need no cast, as copy-on-write
    views of the checkpoint's pages (see `distload.io.mapped`); elsewhere nothing."""
    if device.type != "cpu" or plan.format != "safetensors":
        return {}, ReadStats()
    stage = plan.stage(rank)
    want = {p.key for p in stage.params if p.src_rank == rank
            and (tiers or {}).get(p.key, Tier.DEVICE) == Tier.DEVICE}
    dtypes = {p.key: p.dtype for p in stage.params}
    return map_tensors([m for m in stage.reads if m.name in want and dtypes[m.name] == m.dtype])


def allocate_stage(plan: LoadPlan, rank: int, module: nn.Module, device: torch.device, *,
                   tiers: Mapping[str, str] | None = None,
                   mapped: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Give every parameter of `module` real storage on `device`, one tensor per
    checkpoint key (tied parameters of one stage share it). Returns key -> tensor.

    `tiers` (key -> `Tier`, from `distload.offload.key_tiers`) leaves ``disk`` keys on
    meta (the offload store holds them) and puts ``cpu`` keys in host memory, pinned on
    CUDA; without it everything goes to `device`."""
    storage: dict[str, torch.Tensor] = {}
    params: dict[str, nn.Parameter] = {}
    for src in plan.stage(rank).params:
        tier = tiers.get(src.key, Tier.DEVICE) if tiers else Tier.DEVICE
        if tier == Tier.DISK:
            continue
        if src.key not in params:
            meta_param = module.get_parameter(src.param)
            host = tier == Tier.CPU and device.type != "cpu"
            if mapped and src.key in mapped:
                storage[src.key] = mapped[src.key]
            else:
                storage[src.key] = torch.empty(meta_param.shape, dtype=dtype_from_name(src.dtype),
                                               device="cpu" if host else device,
                                               pin_memory=host and device.type == "cuda")
            params[src.key] = nn.Parameter(storage[src.key], requires_grad=False)
        parent_name, _, attr = src.param.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, params[src.key])
    return storage


def read_stage(plan: LoadPlan, rank: int, storage: dict[str, torch.Tensor], *, workers: int = 2,
               skip: Collection[str] = ()) -> ReadStats:
    """Read exactly this rank's byte ranges into `storage` (keys it lacks, the disk
    tier's, are read by `distload.offload.attach` instead; keys in `skip` were mapped)."""
    reads = [m for m in plan.stage(rank).reads if m.name in storage and m.name not in skip]
    if plan.format == "bin":
        return _read_bin(reads, storage)
    return read_tensors(reads, storage, workers=workers)


def _read_bin(reads, storage) -> ReadStats:
    from .checkpoint import load_bin_tensors  # torch.load(mmap=True, weights_only=True)

    stats = ReadStats()
    by_file: dict[str, list[str]] = {}
    for m in reads:
        by_file.setdefault(m.file, []).append(m.name)
    for file, names in sorted(by_file.items()):
        for name, tensor in load_bin_tensors(file, names).items():
            storage[name].copy_(tensor)
            stats.bytes_read += tensor.numel() * tensor.element_size()
    return stats


def exchange_tied(plan: LoadPlan, rank: int, storage: dict[str, torch.Tensor]) -> int:
    """Send the tied tensors this rank read to the ranks that also need them, and receive
    the ones it needs. Every rank calls it (a no-op without tied tensors across stages).
    Returns the bytes received."""
    stage = plan.stage(rank)
    ops = [dist.P2POp(dist.isend, storage[key], dst) for key, dst in stage.sends]
    received = 0
    seen: set[str] = set()
    for src in stage.params:
        if src.src_rank != rank and src.key not in seen:
            seen.add(src.key)
            ops.append(dist.P2POp(dist.irecv, storage[src.key], src.src_rank))
            received += storage[src.key].numel() * storage[src.key].element_size()
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


def finish_stage(module: nn.Module, device: torch.device, *, offloaded: Collection[str] = ()) -> None:
    """Compute non-persistent buffers (RoPE frequencies) on the device, and fail if any
    parameter or buffer is still on meta (but those in `offloaded`, which are streamed
    onto the device only while their module runs)."""
    init = getattr(module, "init_buffers", None)
    if callable(init):
        init(device)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta and n not in offloaded]
    if left:
        raise LoadError(f"{len(left)} tensor(s) left on the meta device after loading: {', '.join(left[:8])}")
