"""Shared by the offload workers and tests: a plan with half of each stage's layers on the
disk tier, installed into `distload.load` by wrapping rank 0's planning step."""

from __future__ import annotations

import dataclasses

from distload.plan.types import LoadPlan, Tier


def half_on_disk(plan: LoadPlan, tier: str = Tier.DISK, *, everything: bool = False) -> LoadPlan:
    """`plan` with the later half of each stage's layers on `tier` (or, `everything`, all
    its units: embedding and head too). The reads, bytes and everything else the planner
    computed stay as they are: tiers do not change them."""
    stages = []
    for st in plan.stages:
        layers = [u for u in st.units if ".layers." in u]
        moved = set(st.units) if everything else set(layers[len(layers) // 2:])
        tiers = tuple(tier if u in moved else t for u, t in zip(st.units, st.unit_tiers))
        stages.append(st.with_unit_tiers(tiers))
    return dataclasses.replace(plan, stages=tuple(stages))


def install_tiers(tier: str = Tier.DISK, *, everything: bool = False) -> None:
    """Make `distload.load` plan with half of each stage's layers (or all its units) on
    `tier`."""
    import distload.loader.api as api

    plan_load = api.plan_load
    api.plan_load = lambda *a: half_on_disk(plan_load(*a), tier, everything=everything)
