"""Reading a Gemma 4 text config.json (``gemma4_text``, or the `text_config` of a ``gemma4``
multimodal one) into a `Gemma4Config`, every field the family reads checked before anything
is built; see `distload.models.gemma4` for what the fields mean to the model.

transformers 5.25 writes the global layers' shape as `per_layer_config` overrides by layer
index; the hub's configs have `global_head_dim` / `num_global_key_value_heads` instead.
Both read the same.

Example::

    cfg = read_gemma4_text(json.load(open("gemma-4-E2B/config.json")))
    cfg.kv_source[-1], cfg.layer_head_dim(4)        # the sharing source, the global head size
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .common.config import (FULL, SLIDING, DecoderConfig, positive_int, read_decoder, read_layer_types,
                            text_config)
from .common.layers import activation
from .common.rope import RopeParams, read_rope

__all__ = ["Gemma4Config", "read_gemma4_text", "read_gemma4"]

# transformers 5.25's Gemma4TextConfig defaults.
_DEFAULTS: dict[str, Any] = {
    "head_dim": 256, "max_position_embeddings": 131072, "num_key_value_heads": 4,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "eos_token_id": 1,
    "bos_token_id": 2, "pad_token_id": 0, "intermediate_size": 9216}
_ROPES = {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
          FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
_OVERRIDES = ("head_dim", "num_key_value_heads")   # what per_layer_config may change


@dataclass(frozen=True, kw_only=True)
class Gemma4Config(DecoderConfig):
    """A Gemma 4 text decoder. `head_dim` / `num_key_value_heads` / `rope` are the
    sliding layers'; `global_head_dim` / `global_kv_heads` / `global_rope` the global
    layers'. `per_layer_size` is PLE's width P (0: no per-layer embeddings);
    `kv_source[i]` the layer whose keys and values layer i attends to (None: its own).

    Example::

        cfg = read_gemma4_text(json.load(open("gemma-4-E2B/config.json")))
        cfg.kv_source[-1], cfg.layer_head_dim(4)        # 14, 512
    """

    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    global_head_dim: int = 512
    global_kv_heads: int = 4
    global_rope: RopeParams = RopeParams()
    k_eq_v: bool = False
    per_layer_size: int = 0
    per_layer_vocab: int = 0
    kv_source: tuple[int | None, ...] = ()
    double_wide_mlp: bool = False
    num_experts: int = 0            # 0: no mixture of experts beside the MLP
    top_k_experts: int = 0
    moe_intermediate_size: int = 0

    def is_global(self, i: int) -> bool:
        return self.layer_types[i] == FULL

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.is_global(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.global_kv_heads if self.is_global(i) else self.num_key_value_heads

    @property
    def kv_sources(self) -> frozenset[int]:
        """The layers whose keys and values later layers reuse."""
        return frozenset(s for s in self.kv_source if s is not None)


def _type_overrides(d: dict[str, Any], types: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Layer type -> the head_dim / num_key_value_heads its layers override: from
    `per_layer_config` (transformers 5.25 writes it, layer index -> overrides) or, as
    transformers builds it when absent, `global_head_dim` (512) and, with
    `attention_k_eq_v`, `num_global_key_value_heads` for the global layers. Every layer of
    a type must override alike (one RoPE table per type, as in transformers)."""
    per_layer = d.get("per_layer_config")
    if per_layer is None:
        full: dict[str, int] = {"head_dim": positive_int(d, "global_head_dim", 512)}
        if d.get("attention_k_eq_v") and d.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = positive_int(d, "num_global_key_value_heads")
        per_layer = {i: full for i, t in enumerate(types) if t == FULL}
    if not isinstance(per_layer, dict):
        raise ValueError(f"per_layer_config must map layer indices to overrides, not {per_layer!r}")
    by_layer: dict[int, dict[str, int]] = {}
    for key, over in per_layer.items():
        index = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else -1
        if not 0 <= index < len(types):
            raise ValueError(f"per_layer_config has layer {key!r}; the model has {len(types)} layers")
        if not isinstance(over, dict) or any(k not in _OVERRIDES for k in over):
            raise ValueError(f"per_layer_config.{key} must override only {', '.join(_OVERRIDES)}, "
                             f"not {over!r}")
        by_layer[index] = {k: positive_int(over, k) for k in over}
    out: dict[str, dict[str, int]] = {}
    for kind in set(types):
        seen = [by_layer.get(i, {}) for i, t in enumerate(types) if t == kind]
        if any(s != seen[0] for s in seen):
            raise ValueError(f"per_layer_config overrides the {kind} layers unlike one another; "
                             "distload (as transformers) needs one shape per layer type")
        out[kind] = seen[0]
    return out


def _ropes(d: dict[str, Any], max_pos: int) -> dict[str, RopeParams]:
    params = d.get("rope_parameters")
    if params is None:
        params = _ROPES
    if not isinstance(params, dict) or not (FULL in params or SLIDING in params):
        raise ValueError(f"rope_parameters must map {SLIDING!r} and {FULL!r} to their RoPE, not {params!r}")
    out = {}
    for kind in (SLIDING, FULL):
        field = f"rope_parameters.{kind}"
        p = params.get(kind, _ROPES[kind])
        if not isinstance(p, dict):
            raise ValueError(f"{field} must be an object, not {p!r}")
        rope = read_rope({}, params=p, default_theta=_ROPES[kind]["rope_theta"], max_positions=max_pos,
                         allowed=("default", "linear", "proportional"), field=field)
        # transformers' Gemma 4 computes its "default" RoPE over the whole head, whatever
        # partial_rotary_factor says.
        out[kind] = replace(rope, partial_rotary_factor=1.0) if rope.rope_type == "default" else rope
    return out


def _kv_sources(d: dict[str, Any], types: tuple[str, ...]) -> tuple[int | None, ...]:
    """Per layer, the layer whose keys and values it reuses (None: its own), as
    transformers' `kv_sharing_modes`: the last `num_kv_shared_layers` layers reuse those of
    the last earlier layer of their type."""
    layers = len(types)
    shared = d.get("num_kv_shared_layers") or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < layers:
        raise ValueError(f"num_kv_shared_layers must be an integer from 0 to num_hidden_layers - 1 "
                         f"({layers - 1}), not {shared!r}")
    first = layers - shared
    sources = {t: max(i for i in range(first) if types[i] == t) for t in set(types[:first])}
    if shared and set(types[first:]) - set(sources):
        raise ValueError(f"num_kv_shared_layers ({shared}): a shared layer's type "
                         f"{sorted(set(types[first:]) - set(sources))} has no earlier layer of its "
                         "type to take keys and values from (layer_types)")
    return tuple(None if i < first else sources[types[i]] for i in range(layers))


def _moe(d: dict[str, Any]) -> dict[str, int]:
    """The experts of `enable_moe_block` (26B-A4B: a dense MLP and experts in every
    layer); their fields are read only then."""
    if not d.get("enable_moe_block"):
        return {}
    experts = positive_int(d, "num_experts")
    top_k = positive_int(d, "top_k_experts")
    if top_k > experts:
        raise ValueError(f"top_k_experts ({top_k}) exceeds num_experts ({experts})")
    return {"num_experts": experts, "top_k_experts": top_k,
            "moe_intermediate_size": positive_int(d, "moe_intermediate_size")}


def read_gemma4_text(d: dict[str, Any], *, nested_in: str | None = None) -> Gemma4Config:
    """The `Gemma4Config` of a gemma4_text config.json dict; ValueError naming an
    unsupported field."""
    bidirectional = d.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision"):
        raise ValueError(f"use_bidirectional_attention is {bidirectional!r}: distload runs Gemma 4 as a "
                         "causal LM (null, or 'vision', which text-only inputs never trigger)")
    max_pos = positive_int(d, "max_position_embeddings", _DEFAULTS["max_position_embeddings"])
    ropes = _ropes(d, max_pos)
    fields = read_decoder(d, defaults=_DEFAULTS, act_key="hidden_activation", rope=ropes[SLIDING])
    activation(fields["hidden_act"], "hidden_activation")
    layers = fields["num_hidden_layers"]
    default_types = [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    types = list(read_layer_types(d, layers, default_types))
    types[-1] = FULL   # as transformers forces it (with a warning)
    types = tuple(types)
    over = _type_overrides(d, types)
    sliding, full = over.get(SLIDING, {}), over.get(FULL, {})
    head_dim = sliding.get("head_dim", fields["head_dim"])
    kv_heads = sliding.get("num_key_value_heads", fields["num_key_value_heads"])
    global_kv = full.get("num_key_value_heads", fields["num_key_value_heads"])
    heads = fields["num_attention_heads"]
    for kv in (kv_heads, global_kv):
        if heads % kv:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of each layer's "
                             f"num_key_value_heads ({kv}; per_layer_config, num_global_key_value_heads)")
    per_layer = d.get("hidden_size_per_layer_input", 256)
    if isinstance(per_layer, bool) or not isinstance(per_layer, (int, type(None))) or (per_layer or 0) < 0:
        raise ValueError(f"hidden_size_per_layer_input must be a non-negative integer, not {per_layer!r}")
    per_layer = per_layer or 0
    window = positive_int(d, "sliding_window", 512)
    cap = d.get("final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        raise ValueError(f"final_logit_softcapping must be a positive number or null, not {cap!r}")
    for key in ("attention_bias", "attention_k_eq_v", "use_double_wide_mlp", "enable_moe_block"):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise ValueError(f"{key} must be true or false, not {d[key]!r}")
    return Gemma4Config(
        **fields | {"head_dim": head_dim, "num_key_value_heads": kv_heads, "nested_in": nested_in},
        layer_types=types, sliding_window=window,
        attention_bias=bool(d.get("attention_bias")),
        final_logit_softcapping=None if cap is None else float(cap),
        global_head_dim=full.get("head_dim", fields["head_dim"]), global_kv_heads=global_kv,
        global_rope=ropes[FULL], k_eq_v=bool(d.get("attention_k_eq_v")),
        per_layer_size=per_layer,
        per_layer_vocab=positive_int(d, "vocab_size_per_layer_input", 262144) if per_layer else 0,
        kv_source=_kv_sources(d, types), double_wide_mlp=bool(d.get("use_double_wide_mlp")),
        **_moe(d))


def read_gemma4(d: dict[str, Any]) -> Gemma4Config:
    """The text model of a Gemma 4 multimodal config.json (``model_type: gemma4``)."""
    text = text_config(d, "gemma4", "gemma4_text")
    return read_gemma4_text(text, nested_in="gemma4")

