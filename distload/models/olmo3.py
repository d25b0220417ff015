"""OLMo 3: OLMo 2's decoder (norms after attention and MLP, RMSNorm over the whole query
and key projections) with sliding-window layers (`layer_types`: three sliding to one full
by default) and a RoPE per layer type (transformers 5 nests them in `rope_parameters` by
layer type; a flat `rope_scaling` applies to the full layers only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder, read_layer_types
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import RMSNorm, activation
from .common.rope import RopeParams, RotaryEmbedding, read_rope
from .olmo2 import Olmo2DecoderLayer
from .registry import ModelFamily, register_family

__all__ = ["Olmo3Config", "Olmo3ForCausalLM", "Olmo3DecoderLayer", "read_olmo3"]

# Olmo3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "pad_token_id": 1, "eos_token_id": 50279, "rope_theta": 500000.0}


@dataclass(frozen=True, kw_only=True)
class Olmo3Config(DecoderConfig):
    """An OLMo 3 decoder; `local_rope` is its sliding layers' RoPE. Example::

        cfg = read_olmo3(json.load(open("Olmo-3-1025-7B/config.json")))
        cfg.layer_sliding_window(0), cfg.layer_sliding_window(3)       # 4096, None
    """

    attention_bias: bool = False
    local_rope: RopeParams | None = None


def _ropes(d: dict[str, Any], max_pos: int) -> tuple[RopeParams, RopeParams]:
    params = d.get("rope_parameters")
    theta = _DEFAULTS["rope_theta"]
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full = read_rope(d, params=params.get(FULL) or {}, default_theta=theta, max_positions=max_pos,
                         field=f"rope_parameters.{FULL}")
        local = read_rope(d, params=params.get(SLIDING) or {}, default_theta=theta,
                          max_positions=max_pos, field=f"rope_parameters.{SLIDING}")
        return full, local
    full = read_rope(d, default_theta=theta, max_positions=max_pos)
    return full, RopeParams(theta=full.theta)


def read_olmo3(d: dict[str, Any]) -> Olmo3Config:
    """The `Olmo3Config` of a config.json dict; ValueError naming an unsupported field."""
    max_pos = positive_int(d, "max_position_embeddings", _DEFAULTS["max_position_embeddings"])
    full, local = _ropes(d, max_pos)
    fields = read_decoder(d, defaults=_DEFAULTS, rope=full)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    layer_types = read_layer_types(d, layers, [SLIDING if (i + 1) % 4 else FULL for i in range(layers)])
    window = d.get("sliding_window", 4096)
    window = None if window is None else positive_int(d, "sliding_window")
    return Olmo3Config(**fields, sliding_window=window, layer_types=layer_types if window else None,
                       attention_bias=bool(d.get("attention_bias", False)), local_rope=local)


class Olmo3DecoderLayer(Olmo2DecoderLayer):
    """OLMo 2's layer; a sliding layer takes the local RoPE."""

    def __init__(self, config: Olmo3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.layer_sliding_window(layer_idx) is not None:
            self.self_attn.rope_key = "rotary_local"


class Olmo3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Olmo3DecoderLayer"]

    def __init__(self, config: Olmo3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="olmo")
        local = RotaryEmbedding(config.local_rope, head_dim=config.head_dim,
                                max_positions=config.max_position_embeddings)
        super().__init__(config, DecoderModel(config, Olmo3DecoderLayer, norm=norm,
                                              extra_rotary={"rotary_local": local}))


register_family(ModelFamily(("olmo3",), read_olmo3, Olmo3ForCausalLM))
