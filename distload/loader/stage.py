"""`load_stage`: one rank's whole share of a load, after the plan arrived — the one place
that allocates, maps, reads, exchanges tied tensors, attaches the cpu/disk tiers and
reports. Every rank calls it, with the same plan.

Example::

    stage = load_stage(plan, world, reader=source.reader(ReadOptions()))
    stage.module, stage.report["bytes_read"]
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from torch import nn

from .. import trace
from ..dist import World, agree, watch_peers
from ..errors import LoadError, RankError
from ..checkpoint.types import TensorMeta
from ..io import PosixReader, Reader, ReadOptions, ReadProgress, ReadStats
from ..plan.types import Tier
from .board import JobBoard
from .decode import read_decoded
from .materialize import allocate_stage, exchange_tied, finish_stage, key_tiers, map_stage
from .progress import ProgressMonitor, RankProgress
from .report import rank_report
from .skeleton import build_stage_skeleton
from .tiers import OffloadResult, attach_tiers
from .waits import wait_for_ranks, work_limit

__all__ = ["StageLoad", "load_stage", "read_stage"]


@dataclass
class StageLoad:
    """What `load_stage` made on one rank: its materialized stage, its report (the
    figures of `distload.loader.report.rank_report`) and what its offload tiers did."""

    module: nn.Module
    report: dict
    offload: OffloadResult = field(default_factory=OffloadResult)


def read_stage(reads: list[TensorMeta], storage: dict, *, reader: Reader, skip: Collection[str] = (),
               progress: ReadProgress | None = None, decode: Mapping[str, dict] | None = None) -> ReadStats:
    """Read exactly the byte ranges of `reads` (the stage's read items) into `storage`
    with `reader`; keys it lacks (the disk tier's, read into the offload store instead)
    and keys in `skip` (mapped) are left alone. `decode` (`StagePlan.decode`) names the
    keys made from a quantized checkpoint's parts, which are read and decoded into their
    storage here (`distload.loader.decode`)."""
    decode = {k: d for k, d in (decode or {}).items() if k in storage}
    parts = {name for d in decode.values() for name in d["parts"]}
    stats = reader.read([m for m in reads if m.name in storage and m.name not in skip and m.name not in parts],
                        storage, progress=progress)
    if decode:
        stats.add(read_decoded(reads, storage, decode, reader=reader, progress=progress))
    return stats


def load_stage(plan, world: World, *, reader: Reader | None = None, root: str | None = None,
               options: ReadOptions | None = None, offload_dir: str | os.PathLike | None = None,
               cache_dir: str | None = None, timeout_s: float | None = None,
               board: JobBoard | None = None, module: nn.Module | None = None) -> StageLoad:
    """Materialize this rank's stage of `plan` on `world.device` with `reader` (its
    source's, for this node: `Source.reader`), or a POSIX reader of the directory `root`
    with `options`. Every rank calls it; an error on any rank raises on every rank (the
    others get `RankError`).

    Progress goes to the job's `board` (default: a new one for this load) and rank 0
    shows it (`distload.loader.progress`); the ranks wait for each other at most as long
    as the work needs, or `timeout_s` (`distload.loader.waits`).

    `module`: the stage to fill (on meta, or materialized: its parameters are replaced),
    where the caller built it — a whole model a device map's world-of-one plan covers
    (`distload.compat.accelerate`); default: this rank's stage of distload's own model."""
    if reader is None:
        if root is None:
            raise ValueError("load_stage needs a reader or a root")
        reader = PosixReader(root, options)
    rank, device = world.rank, world.device
    stage = plan.stage(rank)
    board = board or JobBoard.open(world, plan)
    mine = RankProgress(board, plan, rank, root=reader.root)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    error, given, module, storage, stats = None, module, None, {}, ReadStats()
    reads = list(stage.reads)
    with ProgressMonitor.maybe(board, plan, world), mine.beating():
        with trace.span("read stage", "load", bytes=stage.tensor_bytes):
            try:
                reader.check(list(stage.files), plan.file_sizes)
                module = build_stage_skeleton(plan, rank) if given is None else given
                tiers = key_tiers(plan, rank, device)
                mine.phase("reading")
                mapped, stats = map_stage(reads, plan, rank, device, tiers=tiers, reader=reader,
                                          progress=mine)
                storage = allocate_stage(plan, rank, module, device, tiers=tiers, mapped=mapped)
                stats.add(read_stage(reads, storage, reader=reader, skip=mapped, progress=mine,
                                     decode=stage.decode))
            except Exception as exc:  # noqa: BLE001 - every rank learns of it in agree()
                error = exc
        seconds["read"] = time.perf_counter() - start
        _meet(world, board, mine, "read", error, plan=plan, timeout_s=timeout_s, what="reading",
              nbytes=max(s.tensor_bytes for s in plan.stages))
        mark = time.perf_counter()
        if world.distributed:
            mine.phase("exchanging")
            with trace.span("exchange tied", "load", sends=len(stage.sends)), \
                    watch_peers("the exchange of tied weights"):
                exchange_tied(plan, rank, storage)
        seconds["exchange"] = time.perf_counter() - mark
        mark = time.perf_counter()
        offloaded = OffloadResult()
        moved = max(_offload_bytes(plan, s) for s in plan.stages)
        mine.phase("offloading")
        try:  # cpu/disk tiers: pinned host memory, the node's offload directory, streaming hooks
            with trace.span("attach tiers", "load"):
                offloaded = attach_tiers(plan, rank, module, storage, device, reader=reader,
                                         offload_dir=offload_dir, cache_dir=cache_dir,
                                         timeout_s=work_limit(moved, override=timeout_s), progress=mine)
            finish_stage(module, device, offloaded=offloaded.params)
        except Exception as exc:  # noqa: BLE001
            error = exc
        seconds["offload"] = time.perf_counter() - mark
        _meet(world, board, mine, "tiers", error, plan=plan, timeout_s=timeout_s, nbytes=moved,
              what="attaching the cpu/disk tiers (offload writes)")
        mine.phase("done")
    report = rank_report(plan, rank, device=str(device), seconds=time.perf_counter() - start,
                         bytes_read=stats.bytes_read + offloaded.bytes_read, host=world.hosts[rank]
                         if world.hosts else "", staging_bytes=stats.staging_bytes,
                         direct_io_files=stats.direct_files, direct_io_refused_files=stats.refused_files,
                         read_options=reader.options.report(),
                         **{f"{k}_seconds": round(v, 6) for k, v in seconds.items()},
                         **offloaded.report_fields())
    offloaded.bind_report(report)
    return StageLoad(module, report, offloaded)


def _offload_bytes(plan, stage) -> int:
    """Bytes a stage's offloading moves: each disk-tier byte twice (read, written), each
    cpu-tier byte once."""
    tiers = stage.tier_bytes(plan.unit_bytes)
    return 2 * tiers[Tier.DISK] + tiers[Tier.CPU]


def _meet(world: World, board: JobBoard, mine: RankProgress, point: str, error: BaseException | None,
          *, nbytes: int, timeout_s: float | None, what: str, plan) -> None:
    """Every rank: wait on the board until all ranks are at `point` (a limit that scales
    with `nbytes`), then agree on whether any failed. This rank's own error comes first."""
    mine.phase("waiting")
    with trace.span("wait for ranks", "load", point=point):
        try:
            wait_for_ranks(board, world, point, nbytes=nbytes, override=timeout_s, what=what, plan=plan)
        except (LoadError, RankError):
            if error is not None:
                raise error from None
            raise
        agree(world, error)
