"""Rank 0's part of a load: index the checkpoint through its source (headers and config,
no tensor data), build the meta model, map the checkpoint's tensors onto its parameters,
and compute the plan. Runs on rank 0 only; the plan is broadcast to every rank.

Example::

    plan = plan_load(PlanRequest(model="./llama", world_size=2))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint.quant import DECODED_DTYPE, decoded_view, quant_scheme
from ..checkpoint.dtypes import dtype_from_name
from ..errors import CheckpointError, ConfigError, UsageError
from ..log import logger
from ..meta import describe_model, init_empty_weights
from ..models import build_model, family_for
from ..plan.budget import LocalMemory, resolve_budgets
from ..plan.planner import plan_model
from ..plan.reserve import run_shape
from ..plan.types import LoadPlan
from ..sources import Source, open_source
from .memory import measure_local

__all__ = ["PlanRequest", "plan_load"]


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
    workload: str = "generate"               # "forward", "generate" or "any": what to reserve for


def plan_load(req: PlanRequest, source: Source | None = None) -> LoadPlan:
    """Rank 0 only: from the request to the plan every rank will follow. `source` is the
    request's model, already opened (else opened here)."""
    source = source or open_source(req.model, cache_dir=req.cache_dir)
    index = source.index()
    if index.config is None:
        raise CheckpointError(f"{index.path('config.json')} is missing: distload needs the "
                              "model's config.json beside its weights")
    # A quantized format distload does not decode is refused by name before anything else.
    try:
        scheme = quant_scheme(index.config)
    except ValueError as e:
        raise ConfigError(f"{index.path('config.json')}: {e}") from None
    dtype = req.dtype
    if scheme is not None:
        if dtype is None:
            dtype = DECODED_DTYPE
        elif dtype_from_name(dtype).itemsize < 2:
            raise UsageError(f"dtype {dtype} cannot hold the decoded weights of this {scheme.method} "
                             "checkpoint: use bfloat16, float16 or float32")
    # Everything on meta, nothing allocated (a config's sizes are not trusted yet); the
    # models compute their few buffer values on the CPU before moving them to meta.
    try:
        with init_empty_weights(include_buffers=True):
            model = build_model(index.config)
    except ValueError as e:  # the config's values, named by the family or validate_config
        raise ConfigError(f"{index.path('config.json')}: {e}") from None
    spec = describe_model(model)
    tensors, file_sizes = index.relative()   # a plan names no path of this machine
    tensors = type(model).checkpoint_tensors(model.config, tensors)
    try:   # a quantized weight as the model sees it; each rank will read its parts
        tensors, encoded = decoded_view(tensors, scheme)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    # Without measurements (a direct call), every rank is assumed to be like this process.
    measured = req.measured or (measure_local(_local_device()),) * req.world_size
    budgets = resolve_budgets(req.max_memory or {}, measured)
    shape = run_shape(index.config, max_batch_size=req.max_batch_size, max_seq_len=req.max_seq_len,
                      workload=req.workload)
    embedding = getattr(model, "input_embedding_name", None)
    activation = None
    if embedding in tensors and dtype is None:
        activation = tensors[embedding].dtype
    plan = plan_model(spec, tensors, budgets=budgets, source=source.identity(), format=index.format,
                      config=index.config, dtype=dtype, strict=req.strict, shape=shape,
                      file_sizes=file_sizes, activation_dtype=activation or dtype,
                      shard_aware=source.fetches_files, encoded=encoded,
                      keep_float32=family_for(index.config).float32_params(dtype))
    logger.debug("planned %d units over %d ranks", len(spec.units), req.world_size)
    return plan


def _local_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
