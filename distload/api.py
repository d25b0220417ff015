"""`distload.load`: the whole per-rank flow behind one call (see DESIGN.md)."""

from __future__ import annotations

import time

import torch

from . import offload
from .checkpoint.types import dtype_name
from .dist import World, agree, gather_objects, init_world, run_on_rank0
from .errors import PlanError
from .log import logger
from .materialize import allocate_stage, exchange_tied, finish_stage, map_stage, read_stage
from .pipeline.calls import CallChannel
from .pipeline.pipe import Pipeline
from .pipeline.stage import build_stage_skeleton
from .plan.budget import measure_local, parse_max_memory
from .plan.types import LoadPlan
from .prepare import PlanRequest, plan_load
from .report import job_report, rank_report

__all__ = ["load", "plan_job", "normalize_dtype"]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "auto": None, "none": None}


def normalize_dtype(dtype: torch.dtype | str | None) -> str | None:
    """`torch.bfloat16`, "bf16", "bfloat16" → "bfloat16"; None/"auto" → None (keep the
    checkpoint's dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is None else dtype_name(dtype)
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name is not None and not (isinstance(getattr(torch, name, None), torch.dtype)
                                 and getattr(torch, name).is_floating_point):
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype "
                         "(use bfloat16, float16 or float32)")
    return name


def plan_job(model: str = "demo", *, world: World | None = None, dtype: torch.dtype | str | None = None,
             max_memory=None, strict: bool = True, cache_dir: str | None = None,
             offload_dir: str | None = None, max_batch_size: int | None = None,
             max_seq_len: int | None = None, device: str | None = None,
             timeout_s: float = 600.0) -> LoadPlan:
    """The plan every rank will follow, without loading anything (what ``--explain``
    shows, and the `pipe.plan` of a `load` with the same arguments). Every rank calls it:
    each measures its own memory (its own GPU only), rank 0 gathers those, resolves them
    with `max_memory` (see `distload.plan.budget`) and plans; every rank receives the same
    plan and checks its digest.

    Example::

        plan = distload.plan_job("./llama", max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"})
        print(explain_plan(plan))
    """
    world = world or init_world(timeout_s=timeout_s, device=device)
    limits = parse_max_memory(max_memory)  # a bad entry fails here, on every rank alike
    mine = measure_local(world.device, offload_dir=offload_dir or offload.default_offload_dir(cache_dir))
    measured = tuple(gather_objects(world, mine))
    request = PlanRequest(model=model, world_size=world.world_size, dtype=normalize_dtype(dtype),
                          strict=strict, cache_dir=cache_dir, max_memory=limits, measured=measured,
                          max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    def plan_on_rank0() -> tuple[str, str]:
        plan = plan_load(request)
        return plan.to_json(), plan.digest()

    text, digest = run_on_rank0(world, plan_on_rank0)
    plan = LoadPlan.from_json(text)
    if plan.digest() != digest:
        raise PlanError(f"rank {world.rank} received a plan whose digest differs from rank 0's")
    return plan


def load(model: str = "demo", *, dtype: torch.dtype | str | None = None, max_memory=None,
         offload_dir: str | None = None, micro_batches: int | None = None, strict: bool = True,
         cache_dir: str | None = None, device: str | None = None, timeout_s: float = 600.0,
         read_workers: int = 2, max_batch_size: int | None = None,
         max_seq_len: int | None = None) -> Pipeline:
    """Load `model` (a local directory or file, a hub id ``org/name``, or ``"demo"``)
    across the ranks torchrun started — or in this one process — and return this rank's
    `Pipeline`. Every rank calls it with the same arguments.

    Rank 0 plans (see `plan_job`: `max_memory` budgets, room kept for `max_batch_size`
    sequences of `max_seq_len` tokens); each rank reads only its own stage's byte ranges.
    Units the plan puts on the disk tier go to `offload_dir` (default ``<cache>/offload``,
    see `distload.offload`) and are streamed onto the device while they run.

    Example::

        pipe = distload.load("./llama-dir", dtype="bfloat16")
        pipe.report["bytes_read"], pipe.module, pipe.job_report
    """
    world = init_world(timeout_s=timeout_s, device=device)
    plan = plan_job(model, world=world, dtype=dtype, max_memory=max_memory, strict=strict,
                    cache_dir=cache_dir, offload_dir=offload_dir, max_batch_size=max_batch_size,
                    max_seq_len=max_seq_len)
    if world.is_first and plan.unexpected_keys:
        logger.warning("ignoring %d unexpected checkpoint key(s): %s", len(plan.unexpected_keys),
                       ", ".join(plan.unexpected_keys[:8]))

    start = time.perf_counter()
    error, module, bytes_read = None, None, 0
    try:
        module = build_stage_skeleton(plan, world.rank)
        tiers = offload.key_tiers(plan, world.rank, world.device)
        mapped, mapped_stats = map_stage(plan, world.rank, world.device, tiers=tiers)
        storage = allocate_stage(plan, world.rank, module, world.device, tiers=tiers, mapped=mapped)
        bytes_read = mapped_stats.bytes_read + read_stage(plan, world.rank, storage, workers=read_workers,
                                                          skip=mapped).bytes_read
    except Exception as exc:  # noqa: BLE001 - every rank learns of it in agree()
        error = exc
    agree(world, error)
    if world.distributed:
        exchange_tied(plan, world.rank, storage)
    offloaded = offload.OffloadResult()
    try:  # cpu/disk tiers: pinned host memory, the shared offload directory, streaming hooks
        offloaded = offload.attach(plan, world.rank, module, storage, world.device, offload_dir,
                                   cache_dir=cache_dir, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001
        error = exc
    agree(world, error)
    finish_stage(module, world.device, offloaded=offloaded.params)
    seconds = time.perf_counter() - start

    mine = rank_report(plan, world.rank, device=str(world.device), seconds=seconds,
                       bytes_read=bytes_read + offloaded.bytes_read, **offloaded.report_fields())
    offloaded.bind_report(mine)
    everyone = job_report(plan, gather_objects(world, mine))
    return Pipeline(module=module, plan=plan, report=mine, job_report=everyone, world=world,
                    micro_batches=micro_batches, calls=CallChannel.open(world))
