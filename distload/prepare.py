"""Rank 0's part of a load: resolve the model, read headers and config, describe the
meta model and compute the plan. Runs on rank 0 only; the result is broadcast."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import index_checkpoint, resolve_model
from .describe import describe_model
from .errors import CheckpointError
from .log import logger
from .meta import init_empty_weights
from .models import build_model
from .plan.budget import LocalMemory, measure_local, resolve_budgets
from .plan.planner import plan_model
from .plan.reserve import run_shape
from .plan.types import LoadPlan

__all__ = ["PlanRequest", "resolve_checkpoint", "plan_load"]


@dataclass(frozen=True)
class PlanRequest:
    model: str = "demo"
    world_size: int = 1
    dtype: str | None = None
    strict: bool = True
    cache_dir: str | None = None
    max_memory: dict | None = None           # parsed: {rank: bytes, "cpu": bytes, "disk": bytes}
    measured: tuple[LocalMemory, ...] | None = None  # each rank's own measurement, in rank order
    max_batch_size: int | None = None        # room kept on each device for running
    max_seq_len: int | None = None


def resolve_checkpoint(spec: str, cache_dir: str | None = None) -> str:
    """`demo` → the demo checkpoint (made once, under a lock); a path or hub id → a
    local directory or file."""
    if spec in ("", "demo"):
        from .demo import ensure_demo_checkpoint

        return str(ensure_demo_checkpoint(cache_dir))
    return resolve_model(spec, cache_dir=cache_dir)


def plan_load(req: PlanRequest) -> LoadPlan:
    """Rank 0 only: from the request to the plan every rank will follow."""
    path = resolve_checkpoint(req.model, req.cache_dir)
    index = index_checkpoint(path)
    if index.config is None:
        raise CheckpointError(f"{os.path.join(index.root, 'config.json')} is missing: "
                              "distload needs the model's config.json beside its weights")
    # Parameters on meta; buffers (RoPE frequencies, a few floats) computed on the CPU:
    # computing them on meta would import torch's reference kernels (~1-2 s).
    with init_empty_weights(include_buffers=False):
        model = build_model(index.config)
    spec = describe_model(model)
    # Without measurements (a direct call), every rank is assumed to be like this process.
    measured = req.measured or (measure_local(_local_device()),) * req.world_size
    budgets = resolve_budgets(req.max_memory or {}, measured)
    shape = run_shape(index.config, max_batch_size=req.max_batch_size, max_seq_len=req.max_seq_len)
    plan = plan_model(spec, index.tensors, budgets=budgets, checkpoint=index.root,
                      format=index.format, config=index.config, dtype=req.dtype, strict=req.strict,
                      shape=shape)
    logger.debug("planned %d units over %d ranks", len(spec.units), req.world_size)
    return plan


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
