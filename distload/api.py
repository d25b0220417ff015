"""`distload.load`: the whole per-rank flow behind one call (see DESIGN.md)."""

from __future__ import annotations

import time

import torch

from .checkpoint.types import dtype_name
from .dist import agree, gather_objects, init_world, run_on_rank0
from .errors import PlanError
from .log import logger
from .materialize import allocate_stage, exchange_tied, finish_stage, read_stage
from .pipeline.pipe import Pipeline
from .pipeline.stage import build_stage_skeleton
from .plan.types import LoadPlan
from .prepare import PlanRequest, plan_load
from .report import job_report, rank_report

__all__ = ["load", "normalize_dtype"]

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


def load(model: str = "demo", *, dtype: torch.dtype | str | None = None, max_memory=None,
         offload_dir: str | None = None, micro_batches: int | None = None, strict: bool = True,
         cache_dir: str | None = None, device: str | None = None, timeout_s: float = 600.0,
         read_workers: int = 2) -> Pipeline:
    """Load `model` (a local directory or file, a hub id ``org/name``, or ``"demo"``)
    across the ranks torchrun started — or in this one process — and return this rank's
    `Pipeline`. Every rank calls it with the same arguments.

    Rank 0 plans; each rank reads only the byte ranges of its own stage's tensors.

    Example::

        pipe = distload.load("./llama-dir", dtype="bfloat16")
        pipe.report["bytes_read"], pipe.module, pipe.job_report
    """
    world = init_world(timeout_s=timeout_s, device=device)
    request = PlanRequest(model=model, world_size=world.world_size, dtype=normalize_dtype(dtype),
                          strict=strict, cache_dir=cache_dir)

    def plan_on_rank0() -> tuple[str, str]:
        plan = plan_load(request)
        return plan.to_json(), plan.digest()

    text, digest = run_on_rank0(world, plan_on_rank0)
    plan = LoadPlan.from_json(text)
    if plan.digest() != digest:
        raise PlanError(f"rank {world.rank} received a plan whose digest differs from rank 0's")
    if world.is_first and plan.unexpected_keys:
        logger.warning("ignoring %d unexpected checkpoint key(s): %s", len(plan.unexpected_keys),
                       ", ".join(plan.unexpected_keys[:8]))

    start = time.perf_counter()
    error, module, bytes_read = None, None, 0
    try:
        module = build_stage_skeleton(plan, world.rank)
        storage = allocate_stage(plan, world.rank, module, world.device)
        bytes_read = read_stage(plan, world.rank, storage, workers=read_workers).bytes_read
    except Exception as exc:  # noqa: BLE001 - every rank learns of it in agree()
        error = exc
    agree(world, error)
    if world.distributed:
        exchange_tied(plan, world.rank, storage)
    finish_stage(module, world.device)
    seconds = time.perf_counter() - start

    mine = rank_report(plan, world.rank, device=str(world.device), bytes_read=bytes_read, seconds=seconds)
    everyone = job_report(plan, gather_objects(world, mine))
    return Pipeline(module=module, plan=plan, report=mine, job_report=everyone, world=world,
                    micro_batches=micro_batches)
