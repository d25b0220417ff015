"""A tied tensor whose home on a GPU rank is the CPU tier is exchanged in host memory
over the host (gloo) group: no device buffer outside the plan. No GPU here, so the
exchange's ops are recorded (group, direction, peer, the buffer's device) instead of run,
with a stand-in host group as `distload.dist` makes for NCCL."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from distload import dist as ddist
from distload.loader import materialize
from distload.loader.materialize import exchange_tied, key_tiers
from distload.plan.budget import RankBudget
from distload.plan.types import Tier

from .test_planner import _model_plan

KEY = "model.embed_tokens.weight"


def _plan(receiver_tier: str):
    """Rank 0 reads the embedding and sends it to rank 1 (the tied head), where it lives
    on `receiver_tier`."""
    plan, _ = _model_plan(2, [RankBudget(640), RankBudget(130)], tied=True, vocab=8)
    assert plan.stages[0].sends == ((KEY, 1),)
    s1 = plan.stages[1]
    params = tuple(dataclasses.replace(p, tier=receiver_tier) if p.key == KEY else p for p in s1.params)
    return dataclasses.replace(plan, stages=(plan.stages[0], dataclasses.replace(s1, params=params)))


@pytest.fixture
def recorded(monkeypatch):
    host_group, ops = object(), []

    class Op:
        def __init__(self, fn, tensor, peer, group=None):
            ops.append((fn.__name__, peer, "host" if group is host_group else "device", tensor))

    monkeypatch.setitem(ddist._GROUPS, "cpu", host_group)
    monkeypatch.setattr(materialize.dist, "P2POp", Op)
    monkeypatch.setattr(materialize.dist, "batch_isend_irecv", lambda batch: [])
    return ops


def test_cpu_tier_tied_key_is_not_given_device_storage_on_a_gpu():
    plan = _plan(Tier.CPU)
    assert key_tiers(plan, 1, torch.device("cuda"))[KEY] == Tier.CPU      # its arena view
    assert key_tiers(plan, 0, torch.device("cuda"))[KEY] == Tier.DEVICE   # the sender's home
    assert key_tiers(_plan(Tier.DEVICE), 1, torch.device("cuda"))[KEY] == Tier.DEVICE


def test_cpu_tier_tied_key_is_exchanged_in_host_memory_over_the_host_group(recorded):
    plan = _plan(Tier.CPU)
    host = torch.zeros(8, 8)                   # rank 1's pinned-arena view (CPU)
    assert exchange_tied(plan, 1, {KEY: host}) == host.nbytes
    ((op, peer, group, buf),) = recorded
    assert (op, peer, group) == ("irecv", 0, "host") and buf is host
    recorded.clear()
    exchange_tied(plan, 0, {KEY: torch.ones(8, 8)})   # the sender agrees on the group
    ((op, peer, group, buf),) = recorded
    assert (op, peer, group) == ("isend", 1, "host") and buf.device.type == "cpu"


def test_device_tier_tied_key_stays_on_the_device_group(recorded):
    plan = _plan(Tier.DEVICE)
    t = torch.zeros(8, 8)
    exchange_tied(plan, 1, {KEY: t})
    exchange_tied(plan, 0, {KEY: t})
    assert [(op, peer, group) for op, peer, group, _ in recorded] == [("irecv", 0, "device"),
                                                                      ("isend", 1, "device")]
