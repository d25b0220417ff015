"""Device memory kept free for running: the KV cache and activations of the largest batch
the job will run, so that the first forward after a load does not run out of memory.

Per unit (pure; the sizes come from `describe_model`):

* ``kv_bytes`` — what the unit's KV cache holds at full length: ``batch * seq *
  kv_per_token * itemsize`` (k_proj + v_proj outputs per token; from the config when the
  unit names no such projections). KV caches stay on the device even where the unit's
  weights are offloaded, so a stage reserves the sum over its units. A linear-attention
  unit keeps instead a fixed float32 state per sequence: ``batch * state * 4``; a unit
  whose cache keeps a window of W tokens (sliding windows, chunks): ``batch * min(seq, W)``
  tokens.
* ``work_bytes`` — the transient activations while the unit runs on a whole prefill
  (``batch * seq`` tokens): its input and every Linear/Embedding output in the compute
  dtype, plus one float32 copy of its widest output (logits, RMSNorm's upcast). Units run
  one after another, so a stage reserves the largest.

What is reserved depends on the workload (`RunShape.workload`): ``"forward"`` returns
full-sequence logits and keeps no KV cache; ``"generate"`` keeps every KV cache and makes
logits for the last position only (the head's outputs are ``batch`` rows, not ``batch *
seq``); ``"any"`` (the default: a loaded pipeline serves both) reserves for both.

Attention scores are not counted: SDPA's flash and memory-efficient kernels never
materialize the ``seq x seq`` matrix on CUDA.

Example::

    shape = run_shape(config, max_batch_size=8, max_seq_len=4096)
    res = unit_reserves(spec, shape, itemsize=2, config=config)
    stage_reserve(res[1:41])        # bytes a stage holding layers 0..39 keeps free
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..meta.describe import ModelSpec

__all__ = ["RunShape", "UnitReserve", "run_shape", "unit_reserves", "stage_reserve", "DEFAULT_MAX_SEQ_LEN",
           "WORKLOADS"]

DEFAULT_MAX_SEQ_LEN = 2048
WORKLOADS = ("any", "forward", "generate")


@dataclass(frozen=True)
class RunShape:
    """The largest batch the job will run: sequences per batch, tokens per sequence
    (prompt plus generated)."""

    max_batch_size: int = 1
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    workload: str = "any"

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload {self.workload!r}: use one of {', '.join(WORKLOADS)}")

    def as_dict(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                "workload": self.workload}

    @property
    def tokens(self) -> int:
        return self.max_batch_size * self.max_seq_len


@dataclass(frozen=True)
class UnitReserve:
    kv_bytes: int = 0      # KV cache at full length (summed over a stage)
    work_bytes: int = 0    # transient activations (a stage keeps the largest)


def run_shape(config: Mapping | None = None, *, max_batch_size: int | None = None,
              max_seq_len: int | None = None, workload: str = "any") -> RunShape:
    """The `RunShape` for the user's flags: batch 1 by default; sequence length
    `DEFAULT_MAX_SEQ_LEN` capped at the model's ``max_position_embeddings``; `workload`
    as in the module docstring. A longer `max_seq_len` than the model supports is an error.

    Example::

        run_shape({"max_position_embeddings": 512})            # RunShape(1, 512)
        run_shape({}, max_batch_size=4, max_seq_len=100)       # RunShape(4, 100)
    """
    batch = 1 if max_batch_size is None else int(max_batch_size)
    if batch < 1:
        raise ValueError(f"max batch size must be at least 1, not {max_batch_size}")
    limit = config_value(config, "max_position_embeddings")
    if max_seq_len is None:
        seq = min(DEFAULT_MAX_SEQ_LEN, limit) if limit else DEFAULT_MAX_SEQ_LEN
    else:
        seq = int(max_seq_len)
        if seq < 1:
            raise ValueError(f"max sequence length must be at least 1, not {max_seq_len}")
        if limit and seq > limit:
            raise ValueError(f"max sequence length {seq} exceeds the model's "
                             f"max_position_embeddings ({limit})")
    return RunShape(batch, seq, workload)


# GPT-2-style config.json names of the standard keys (transformers' `attribute_map`)
_ALIASES = {"max_position_embeddings": "n_positions", "num_attention_heads": "n_head", "hidden_size": "n_embd"}


def config_value(config: Mapping | None, key: str):
    """config.json's `key`, or its GPT-2-style alias (``n_positions``, ``n_head``,
    ``n_embd``: GPT-2, GPTBigCode, GPT-J); None if neither is there."""
    config = config or {}
    value = config.get(key)
    return config.get(_ALIASES[key]) if value is None and key in _ALIASES else value


def _config_kv_per_token(config: Mapping | None) -> int:
    if not config:
        return 0
    heads = config_value(config, "num_attention_heads")
    hidden = config_value(config, "hidden_size")
    if not heads or not hidden:
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * kv_heads * head_dim


def unit_reserves(spec: ModelSpec, shape: RunShape | None, *, itemsize: int,
                  config: Mapping | None = None) -> tuple[UnitReserve, ...]:
    """One `UnitReserve` per unit of `spec` (all zero when `shape` is None: nothing
    reserved, as accelerate does). A unit of a no-split class that names no k/v
    projections takes its KV size from `config`. The head (``spec.head``) makes logits for
    the last position only under ``workload="generate"``.

    Example::

        unit_reserves(spec, RunShape(1, 128), itemsize=2)[1].kv_bytes   # layer 0's KV cache
    """
    if shape is None:
        return tuple(UnitReserve() for _ in spec.units)
    tokens = shape.tokens
    fallback_kv = _config_kv_per_token(config) if shape.workload != "forward" else 0
    out = []
    for unit in spec.units:
        kv = unit.kv_per_token if shape.workload != "forward" else 0
        if kv == 0 and not unit.state_per_sequence and unit.kind and unit.kind in spec.no_split_classes:
            kv = fallback_kv
        if shape.workload == "generate" and unit.name == spec.head:
            # its input is the whole sequence; its outputs, one row per sequence
            outputs = unit.act_per_token - unit.in_width
            work = (tokens * unit.in_width * itemsize
                    + shape.max_batch_size * (outputs * itemsize + unit.max_out * 4))
        else:
            work = tokens * (unit.act_per_token * itemsize + unit.max_out * 4)
        state = unit.state_per_sequence * 4 * shape.max_batch_size if shape.workload != "forward" else 0
        kept = shape.max_batch_size * min(shape.max_seq_len, unit.kv_tokens) if unit.kv_tokens else tokens
        out.append(UnitReserve(kv_bytes=kept * kv * itemsize + state, work_bytes=work))
    return tuple(out)


def stage_reserve(reserves: Sequence[UnitReserve]) -> int:
    """Bytes a stage made of these units keeps free: every KV cache plus the largest
    transient working set.

    Example::

        stage_reserve([UnitReserve(10, 5), UnitReserve(10, 7)])   # 27
    """
    return sum(r.kv_bytes for r in reserves) + max((r.work_bytes for r in reserves), default=0)
