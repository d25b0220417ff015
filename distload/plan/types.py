"""The load plan: plain, frozen, JSON-serializable data that every rank shares.

Rank 0 computes it once (see `distload.plan.build`); every rank receives the same bytes
and checks their digest. Nothing here touches files, devices or processes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from ..checkpoint.types import TensorMeta

__all__ = ["PLAN_VERSION", "Tier", "ParamSource", "StagePlan", "LoadPlan"]

PLAN_VERSION = 2


class Tier:
    """Where a unit's weights live while the model runs."""

    DEVICE = "device"
    CPU = "cpu"
    DISK = "disk"
    ALL = (DEVICE, CPU, DISK)

    @staticmethod
    def most_resident(tiers) -> str:
        """The tier nearest the device among `tiers` (a tensor used by a device unit and
        an offloaded one stays on the device)."""
        return min(tiers, key=Tier.ALL.index)


@dataclass(frozen=True)
class ParamSource:
    """Where one parameter of a stage comes from and where it lives: checkpoint tensor
    `key`, read by `src_rank` (this stage's own rank, or the rank that reads a tied tensor
    and sends it), materialized as `dtype`, held on `tier` while the model runs (the most
    resident tier of the stage's units that use `key`), on `device` when it is not the
    rank's own."""

    param: str
    key: str
    src_rank: int
    dtype: str        # the dtype the parameter is materialized in
    tier: str = Tier.DEVICE
    device: str = ""  # where a device-tier parameter lives; "" the rank's device (a single
                      # process following a device map may span several: "cuda:1", "cpu")


@dataclass(frozen=True)
class StagePlan:
    """What one rank owns, reads and holds."""

    rank: int
    units: tuple[str, ...]                 # module names, in execution order
    unit_tiers: tuple[str, ...]            # a Tier per unit
    params: tuple[ParamSource, ...]        # every parameter of the stage
    reads: tuple[TensorMeta, ...]          # tensors this rank reads, by (file, offset)
    sends: tuple[tuple[str, int], ...]     # (checkpoint key, destination rank) of tied tensors
    tensor_bytes: int                      # bytes of `reads` in the checkpoint
    param_bytes: int                       # bytes the stage holds after any cast
    cost: float                            # estimated per-token compute (FLOPs)
    reserved_bytes: int = 0                # device memory kept for activations and KV cache
    bound: str = ""                        # what limited this stage, for --explain
    budget: dict = field(default_factory=dict)    # the rank's {"device", "cpu", "disk", "source"}
    held_bytes: dict = field(default_factory=dict)  # bytes held per tier, a tied tensor once
    plan_cost: float = 0.0                 # the planner's cost: FLOPs plus streaming penalty
    stream_slots: int = 0                  # units streamed in at once: 2 prefetch, 1 not, 0 none
    # reserved_bytes as {"kv", "work", "stream"}; "host_staging": host bytes beside the cpu
    # tier for the disk tier's pinned staging (in the cpu budget)
    reserve: dict = field(default_factory=dict)
    # keys this rank decodes from a quantized checkpoint's parts (in `reads`):
    # key -> {"method": "fp8" | "mxfp4", "parts": [checkpoint names], "block": [r, c] | None}
    decode: dict = field(default_factory=dict)
    # persistent buffers this rank fills from the checkpoint beside its parameters (a
    # device map's plan: the caller's model may have them; distload's own models have none)
    buffers: tuple[TensorMeta, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """The checkpoint files this rank reads, for its parameters and its buffers
        (sorted): what its node must fetch, and check, before it reads."""
        return tuple(sorted({m.file for m in self.reads} | {m.file for m in self.buffers}))

    def tier_bytes(self, sizes: dict[str, int]) -> dict[str, int]:
        out = {t: 0 for t in Tier.ALL}
        for unit, tier in zip(self.units, self.unit_tiers):
            out[tier] += sizes.get(unit, 0)
        return out

    def unit_of(self, param: str) -> str:
        """The unit of this stage that holds parameter `param` (the longest prefix)."""
        return max((u for u in self.units if param.startswith(u + ".")), key=len)

    def with_unit_tiers(self, unit_tiers: tuple[str, ...]) -> "StagePlan":
        """This stage with its units on `unit_tiers`, every parameter's tier following."""
        by_unit = dict(zip(self.units, unit_tiers))
        home: dict[str, str] = {}
        for p in self.params:
            tier = by_unit[self.unit_of(p.param)]
            home[p.key] = Tier.most_resident((home.get(p.key, tier), tier))
        params = tuple(replace(p, tier=home[p.key]) for p in self.params)
        return replace(self, unit_tiers=tuple(unit_tiers), params=params)


@dataclass(frozen=True)
class LoadPlan:
    """The whole job's plan. `source` identifies the checkpoint (`distload.sources`: its
    kind, a label, a hub commit) and every file name in the plan is relative to its root,
    which each rank finds on its own node: nothing here is a path of rank 0's machine.
    `file_sizes` lets each rank check it sees the same files. `config` is the model's
    config.json, so ranks build the same meta model without reading files; `dtype` is
    the cast target (None: keep the checkpoint's own dtypes); `activation_dtype` is the
    dtype of the hidden states the stages exchange."""

    source: dict
    format: str
    config: dict
    dtype: str | None
    world_size: int
    stages: tuple[StagePlan, ...]
    checkpoint_bytes: int = 0              # tensor bytes of the whole checkpoint
    unit_bytes: dict[str, int] = field(default_factory=dict)
    no_split_units: tuple[str, ...] = ()   # the unit names the planner chose, for explain
    unexpected_keys: tuple[str, ...] = ()  # checkpoint keys no parameter uses (strict=False)
    no_split_classes: tuple[str, ...] = () # classes kept whole (given, or the model's own)
    run_shape: dict = field(default_factory=dict)  # {"max_batch_size", "max_seq_len", "workload"}
    file_sizes: dict = field(default_factory=dict)  # checkpoint file (relative) -> bytes
    activation_dtype: str = "float32"
    version: int = PLAN_VERSION

    def stage(self, rank: int) -> StagePlan:
        return self.stages[rank]

    @property
    def label(self) -> str:
        """The checkpoint's name for people (a directory's name, ``org/name@commit``)."""
        return str(self.source.get("label", "?"))

    # --- serialization ------------------------------------------------------------
    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal plans give equal strings."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "LoadPlan":
        d = json.loads(text)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} != {PLAN_VERSION}")
        stages = tuple(_stage_from_dict(s) for s in d.pop("stages"))
        d["no_split_units"] = tuple(d.get("no_split_units", ()))
        d["unexpected_keys"] = tuple(d.get("unexpected_keys", ()))
        d["no_split_classes"] = tuple(d.get("no_split_classes", ()))
        return cls(stages=stages, **d)


def _stage_from_dict(s: dict) -> StagePlan:
    return StagePlan(
        rank=s["rank"],
        units=tuple(s["units"]),
        unit_tiers=tuple(s["unit_tiers"]),
        params=tuple(ParamSource(**p) for p in s["params"]),
        reads=tuple(TensorMeta(**{**t, "shape": tuple(t["shape"])}) for t in s["reads"]),
        sends=tuple((k, int(r)) for k, r in s["sends"]),
        tensor_bytes=s["tensor_bytes"],
        param_bytes=s["param_bytes"],
        cost=s["cost"],
        reserved_bytes=s.get("reserved_bytes", 0),
        bound=s.get("bound", ""),
        budget=s.get("budget", {}),
        held_bytes=s.get("held_bytes", {}),
        plan_cost=s.get("plan_cost", 0.0),
        stream_slots=s.get("stream_slots", 0),
        reserve=s.get("reserve", {}),
        decode=s.get("decode", {}),
        buffers=tuple(TensorMeta(**{**t, "shape": tuple(t["shape"])}) for t in s.get("buffers", ())),
    )
