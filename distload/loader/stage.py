"""`load_stage`: one rank's whole share of a load, after the plan arrived — the one place
that allocates, maps, reads, exchanges tied tensors, attaches the cpu/disk tiers and
reports. Every rank calls it, with the same plan.

Example::

    stage = load_stage(plan, world, root=source.root())
    stage.module, stage.report["bytes_read"]
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from torch import nn

from ..dist import World, agree, watch_peers
from ..errors import CheckpointError
from .materialize import allocate_stage, exchange_tied, finish_stage, key_tiers, map_stage, read_stage
from .report import rank_report
from .skeleton import build_stage_skeleton
from .tiers import OffloadResult, attach_tiers

__all__ = ["StageLoad", "load_stage"]


@dataclass
class StageLoad:
    """What `load_stage` made on one rank: its materialized stage, its report (the
    figures of `distload.loader.report.rank_report`) and what its offload tiers did."""

    module: nn.Module
    report: dict
    offload: OffloadResult = field(default_factory=OffloadResult)


def check_files(plan, files, root: str) -> None:
    """The checkpoint files this rank reads are on its node, with the sizes rank 0 saw."""
    for file in files:
        path = os.path.join(root, file)
        want = plan.file_sizes.get(file)
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise CheckpointError(f"{path}: {e.strerror} (a file of the checkpoint rank 0 planned "
                                  f"{plan.label!r})") from None
        if want is not None and size != want:
            raise CheckpointError(f"{path} is {size} bytes on this node but {want} bytes on rank 0's: "
                                  "every node must see the same checkpoint")


def load_stage(plan, world: World, *, root: str, read_workers: int = 2,
               offload_dir: str | os.PathLike | None = None, cache_dir: str | None = None,
               timeout_s: float = 600.0) -> StageLoad:
    """Materialize this rank's stage of `plan` on `world.device` from the checkpoint under
    `root` (this node's directory of it). Every rank calls it; an error on any rank
    raises on every rank (the others get `RankError`)."""
    rank, device = world.rank, world.device
    stage = plan.stage(rank)
    start = time.perf_counter()
    error, module, storage, bytes_read = None, None, {}, 0
    reads = [m.located(root) for m in stage.reads]
    try:
        check_files(plan, sorted({m.file for m in stage.reads}), root)
        module = build_stage_skeleton(plan, rank)
        tiers = key_tiers(plan, rank, device)
        mapped, mapped_stats = map_stage(reads, plan, rank, device, tiers=tiers)
        storage = allocate_stage(plan, rank, module, device, tiers=tiers, mapped=mapped)
        bytes_read = mapped_stats.bytes_read + read_stage(reads, storage, workers=read_workers,
                                                          skip=mapped).bytes_read
    except Exception as exc:  # noqa: BLE001 - every rank learns of it in agree()
        error = exc
    agree(world, error)
    if world.distributed:
        with watch_peers("the exchange of tied weights"):
            exchange_tied(plan, rank, storage)
    offloaded = OffloadResult()
    try:  # cpu/disk tiers: pinned host memory, the node's offload directory, streaming hooks
        offloaded = attach_tiers(plan, rank, module, storage, reads, device, root=root,
                                 offload_dir=offload_dir, cache_dir=cache_dir, timeout=timeout_s)
        finish_stage(module, device, offloaded=offloaded.params)
    except Exception as exc:  # noqa: BLE001
        error = exc
    agree(world, error)
    report = rank_report(plan, rank, device=str(device), seconds=time.perf_counter() - start,
                         bytes_read=bytes_read + offloaded.bytes_read, host=world.hosts[rank]
                         if world.hosts else "", **offloaded.report_fields())
    offloaded.bind_report(report)
    return StageLoad(module, report, offloaded)
