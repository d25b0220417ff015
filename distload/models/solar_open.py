"""Solar Open: GLM-4.5's mixture of experts (`glm4_moe.py`: sigmoid ``noaux_tc`` routing
with the learnt bias, shared experts) in every layer, under Llama's attention (q/k/v
biases from `attention_bias`, no q/k norm) with full RoPE."""

from __future__ import annotations

from typing import Any

from .common.routing import ROUTER_FLOAT32
from .glm4_moe import Glm4MoeConfig, Glm4MoeForCausalLM, read_glm4_moe
from .registry import ModelFamily, register_family

__all__ = ["read_solar_open"]

# SolarOpenConfig's defaults (transformers 5) that differ from GLM-4.5's.
_DEFAULTS = {"head_dim": 128, "rope_theta": 1_000_000.0, "partial_rotary_factor": 1.0, "moe_intermediate_size": 1280}


def read_solar_open(d: dict[str, Any]) -> Glm4MoeConfig:
    """The config of a solar_open config.json dict (a `Glm4MoeConfig` whose every layer is
    sparse); ValueError naming an unsupported field."""
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    return read_glm4_moe({**d, "first_k_dense_replace": 0, "use_qk_norm": False})


register_family(ModelFamily(("solar_open",), read_solar_open, Glm4MoeForCausalLM, keep_float32=ROUTER_FLOAT32,
                            unread=("intermediate_size", "first_k_dense_replace", "use_qk_norm")))
