"""The steps that give one rank's stage real weights: map or allocate its parameters on
the rank's device (or host memory for the CPU tier), read its byte ranges, exchange tied
tensors with the ranks that share them, and check nothing is left on meta.

Called by `load_stage`, on every rank, in this order:
`key_tiers` → `map_stage` → `allocate_stage` → (the reader's `read`) → (agree) → `exchange_tied`
→ (`distload.loader.tiers`) → `finish_stage`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.types import TensorMeta
from ..dist import _GROUPS
from ..checkpoint.dtypes import dtype_from_name
from ..io import Reader, ReadProgress, ReadStats
from ..io.pinned import HostArena
from ..meta import check_materialized, init_buffers
from ..plan.types import LoadPlan, Tier

__all__ = ["key_tiers", "map_stage", "allocate_stage", "exchange_tied", "finish_stage"]


def key_tiers(plan: LoadPlan, rank: int, device: torch.device | str) -> dict[str, str]:
    """Where `allocate_stage` puts each checkpoint key of `rank`'s stage: its planned tier
    (`ParamSource.tier`), except that the CPU tier of a CPU device *is* the device, and
    that a tied tensor sent to or received from another rank gets device storage for the
    exchange (`distload.loader.tiers` moves it to its tier after) — but for one whose home
    here is the CPU tier of a GPU: it stays in the pinned arena the plan counted and is
    exchanged over the host group (`exchange_tied`), never occupying device memory the
    plan did not give it. ``disk`` keys are not
    allocated: they stay on meta and the offload store holds them (a key decoded from a
    quantized checkpoint too: `attach_tiers` decodes it into its entry)."""
    device = torch.device(device)
    stage = plan.stage(rank)
    exchanged = {k for k, _ in stage.sends} | {p.key for p in stage.params if p.src_rank != rank}
    out = {}
    for src in stage.params:
        tier = src.tier
        if (src.key in exchanged and not (tier == Tier.CPU and device.type == "cuda")) or \
                (tier == Tier.CPU and device.type != "cuda"):
            tier = Tier.DEVICE
        out[src.key] = tier
    return out


def map_stage(reads: Sequence[TensorMeta], plan: LoadPlan, rank: int, device: torch.device, *,
              tiers: Mapping[str, str], reader: Reader, progress: ReadProgress | None = None
              ) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """On the CPU, this rank's own device-tier tensors that need no cast, as the reader
    hands them over without a copy (`Reader.map`: the POSIX reader's copy-on-write views
    of the checkpoint's pages, see `distload.io.mapped`); elsewhere nothing. `reads` are
    the stage's read items; `progress` hears of the bytes as they come in."""
    if device.type != "cpu" or plan.format != "safetensors":
        return {}, ReadStats()
    stage = plan.stage(rank)
    want = {p.key for p in stage.params if p.src_rank == rank and tiers.get(p.key) == Tier.DEVICE
            and p.key not in stage.decode and p.device in ("", "cpu")}
    dtypes = {p.key: p.dtype for p in stage.params}
    return reader.map([m for m in reads if m.name in want and dtypes[m.name] == m.dtype],
                      progress=progress)


def allocate_stage(plan: LoadPlan, rank: int, module: nn.Module, device: torch.device, *,
                   tiers: Mapping[str, str] | None = None,
                   mapped: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Give every parameter of `module` real storage on `device`, one tensor per
    checkpoint key (tied parameters of one stage share it). Returns key -> tensor.

    `tiers` (from `key_tiers`) leaves ``disk`` keys on meta (the offload store holds
    them) and puts ``cpu`` keys in host memory (on CUDA: views of one pinned arena,
    `distload.io.pinned.HostArena`); without it everything goes to `device` (a
    parameter's own `ParamSource.device`, where the plan names one). `mapped` tensors
    (from `map_stage`) are used as they are."""
    storage: dict[str, torch.Tensor] = {}
    params: dict[str, nn.Parameter] = {}
    sources = plan.stage(rank).params
    tier_of = {src.key: tiers.get(src.key, Tier.DEVICE) if tiers else Tier.DEVICE for src in sources}
    # The CUDA CPU tier: one pinned arena of exactly the tier's bytes, each tensor a view
    # (`distload.io.pinned`: pinned one by one, the caching host allocator's power-of-two
    # rounding could take up to twice what the plan counted against the host's RAM).
    arena = None
    if device.type == "cuda":
        sizes = {src.key: _nbytes(module.get_parameter(src.param), src.dtype) for src in sources
                 if tier_of[src.key] == Tier.CPU and not (mapped and src.key in mapped)}
        arena = HostArena(sizes) if sizes else None
    for src in sources:
        tier = tier_of[src.key]
        if tier == Tier.DISK:
            continue
        if src.key not in params:
            meta_param = module.get_parameter(src.param)
            dtype = dtype_from_name(src.dtype)
            host = tier == Tier.CPU and device.type != "cpu"
            home = torch.device(src.device) if src.device and tier == Tier.DEVICE else device
            if mapped and src.key in mapped:
                storage[src.key] = mapped[src.key]
            elif host and arena is not None:
                storage[src.key] = arena.view(src.key, meta_param.shape, dtype)
            else:
                storage[src.key] = torch.empty(meta_param.shape, dtype=dtype,
                                               device="cpu" if host else home)
            params[src.key] = nn.Parameter(storage[src.key], requires_grad=False)
        parent_name, _, attr = src.param.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, params[src.key])
    return storage


def _nbytes(meta_param: torch.Tensor, dtype: str) -> int:
    return meta_param.numel() * dtype_from_name(dtype).itemsize


def exchange_tied(plan: LoadPlan, rank: int, storage: dict[str, torch.Tensor]) -> int:
    """Send the tied tensors this rank read to the ranks that also need them, and receive
    the ones it needs. Every rank calls it (a no-op without tied tensors across stages).
    Returns the bytes received.

    A tensor that is CPU-tier at either end goes over the host (gloo) group in host
    memory: the CPU-tier end's buffer is its pinned-arena view, so it never takes device
    memory outside the plan; a device-tier end copies through a host tensor. Both ends
    decide from the plan alone, so they agree. Device-group ops go as one batch first,
    then host-group ops (a batch is one group's)."""
    stage = plan.stage(rank)
    host_group = _GROUPS.get("cpu")      # None: the default group is gloo itself

    def via_host(key: str, peer: int) -> bool:
        return host_group is not None and any(
            p.key == key and p.tier == Tier.CPU for r in (rank, peer) for p in plan.stage(r).params)

    device_ops, host_ops, copy_back = [], [], []
    for key, dst in stage.sends:
        t = storage[key]
        if via_host(key, dst):
            host_ops.append(dist.P2POp(dist.isend, t if t.device.type == "cpu" else t.to("cpu"),
                                       dst, group=host_group))
        else:
            device_ops.append(dist.P2POp(dist.isend, t, dst))
    received = 0
    seen: set[str] = set()
    for src in stage.params:
        if src.src_rank != rank and src.key not in seen:
            seen.add(src.key)
            t = storage[src.key]
            if via_host(src.key, src.src_rank):
                buf = t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype)
                if buf is not t:
                    copy_back.append((t, buf))
                host_ops.append(dist.P2POp(dist.irecv, buf, src.src_rank, group=host_group))
            else:
                device_ops.append(dist.P2POp(dist.irecv, t, src.src_rank))
            received += t.numel() * t.element_size()
    for ops in (device_ops, host_ops):
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
    for t, buf in copy_back:
        t.copy_(buf)
    return received


def finish_stage(module: nn.Module, device: torch.device, *, offloaded: Collection[str] = ()) -> None:
    """Compute non-persistent buffers (RoPE frequencies) on the device, and fail if any
    parameter or buffer is still on meta (but those in `offloaded`, which are streamed
    onto the device only while their module runs)."""
    init_buffers(module, device)
    check_materialized(module, streamed=offloaded)
