"""Checking a config.json's values before anything is built from them: the fields every
decoder family shares, by type and range, and the relations between them. A family's own
reader checks what only it has. Each problem is a ValueError naming the field (the loader
adds the file: `distload.errors.ConfigError`).

Example::

    validate_config({"model_type": "llama", "hidden_size": "256", ...})
    # ValueError: hidden_size must be an integer, not the string '256'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["validate_config", "MAX_DIM"]

MAX_DIM = 2**31 - 1  # torch sizes are int64, but no model dimension comes near this

# field -> the least value it may take (a dimension or a count)
_INTS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
    "max_position_embeddings": 1, "sliding_window": 1, "num_experts": 1, "num_local_experts": 1,
    "num_experts_per_tok": 1, "moe_intermediate_size": 1, "shared_expert_intermediate_size": 1,
    "decoder_sparse_step": 1, "max_window_layers": 0,
    "sliding_window_pattern": 1,
}
_POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "rope_theta", "rope_local_base_freq",
                    "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping", "logit_scale",
                    "embedding_multiplier", "residual_multiplier", "attention_multiplier",
                    "logits_scaling", "partial_rotary_factor")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
          "norm_topk_prob", "use_qk_norm")


def _describe(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r}"


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {_describe(value)}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")
    if value > MAX_DIM:
        raise ValueError(f"{name} {value} is too large (at most {MAX_DIM})")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {_describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, not {value}")


def validate_config(config: Mapping[str, Any], *, unread: Collection[str] = ()) -> None:
    """Raise ValueError naming the first field of `config` (a config.json dict) that no
    decoder can use. Absent and null fields are left to the family's defaults; fields the
    family does not read (`unread`, and `sliding_window` where `use_sliding_window` is
    false: Qwen's default configs hold 0 there) are never an error."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a config must be a JSON object, not {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"model_type must be a string naming the architecture, not {_describe(model_type)}")
    skip = set(unread)
    if config.get("use_sliding_window") is False:
        skip.add("sliding_window")
    if skip:
        config = {k: v for k, v in config.items() if k not in skip}
    for name, least in _INTS.items():
        if config.get(name) is not None:
            _check_int(name, config[name], least)
    for name in _POSITIVE_FLOATS:
        if config.get(name) is not None:
            _check_float(name, config[name])
    for name in _BOOLS:
        value = config.get(name)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {_describe(value)}")
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = config.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                         for i in ids):
            raise ValueError(f"{name} must be a token id{' or a list of them' if name == 'eos_token_id' else ''}"
                             f", not {_describe(value)}")
    if config.get("hidden_act") is not None and not isinstance(config["hidden_act"], str):
        raise ValueError(f"hidden_act must name an activation, not {_describe(config['hidden_act'])}")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    experts = config.get("num_experts") or config.get("num_local_experts")
    chosen = config.get("num_experts_per_tok")
    if experts and chosen and chosen > experts:
        raise ValueError(f"num_experts_per_tok ({chosen}) exceeds the number of experts ({experts})")
    layer_types = config.get("layer_types")
    layers = config.get("num_hidden_layers")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != layers):
        raise ValueError(f"layer_types must list one entry per layer ({layers}), not {_describe(layer_types)}")
