"""Build one rank's stage on the meta device: the whole model's skeleton, pruned to the
units the plan gives this rank. Nothing is allocated here."""

from __future__ import annotations

from torch import nn

from ..meta import init_empty_weights
from ..models import build_model
from ..plan.types import LoadPlan

__all__ = ["build_stage_skeleton", "prune_to_units"]


def build_stage_skeleton(plan: LoadPlan, rank: int) -> nn.Module:
    """Every rank calls this for its own rank after receiving the plan."""
    # Everything on meta; `finish_stage` computes the buffers (RoPE) on the device.
    with init_empty_weights(include_buffers=True):
        model = build_model(plan.config)
    all_units = [u for s in plan.stages for u in s.units]
    prune_to_units(model, all_units, keep=set(plan.stage(rank).units))
    return model


def prune_to_units(model: nn.Module, units: list[str], *, keep: set[str]) -> None:
    """Remove every unit not in `keep`: a `ModuleDict` entry is deleted (the others keep
    their string keys, so names stay those of the checkpoint); any other module becomes
    `None`, which the models treat as "not on this stage". A tied parameter survives in
    the units that keep it."""
    for name in units:
        if name in keep:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleDict):
            del parent[child]
        else:
            setattr(parent, child, None)
