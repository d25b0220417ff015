"""EXAONE 4.0: OLMo-2-style norms after attention and after the MLP (inside the
residual), per-head RMSNorm on queries and keys, and hybrid attention: with a
`sliding_window`, three sliding layers to one global (`sliding_window_pattern`, or
`layer_types`), and only the sliding layers apply RoPE (the global ones have none);
without one, every layer is global with RoPE.

    layer: x + post_attention_layernorm(attn(x)), then + post_feedforward_layernorm(mlp(x))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder, read_layer_types
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Exaone4Config", "Exaone4ForCausalLM", "Exaone4DecoderLayer", "read_exaone4"]

# Exaone4Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 16384, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "bos_token_id": 0, "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class Exaone4Config(DecoderConfig):
    """An EXAONE 4.0 decoder. Example::

        cfg = read_exaone4(json.load(open("EXAONE-4.0-32B/config.json")))
        cfg.layer_sliding_window(0), cfg.layer_sliding_window(3)      # 4096, None
    """


def _pattern_types(d: dict[str, Any], layers: int) -> list[str]:
    """transformers' layer types from `sliding_window_pattern`: an int N (every Nth layer
    global) or a string of L (local) and G (global) repeated over the layers."""
    pattern = d.get("sliding_window_pattern", 4)
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(layers)]
    n = positive_int(d, "sliding_window_pattern", 4)
    return [SLIDING if (i + 1) % n else FULL for i in range(layers)]


def read_exaone4(d: dict[str, Any]) -> Exaone4Config:
    """The `Exaone4Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    window = d.get("sliding_window", 4096)
    if window is None:
        return Exaone4Config(**fields)
    window = positive_int(d, "sliding_window")
    layer_types = read_layer_types(d, layers, [] if d.get("layer_types") else _pattern_types(d, layers))
    return Exaone4Config(**fields, sliding_window=window, layer_types=layer_types)


class Exaone4DecoderLayer(DecoderLayer):
    def __init__(self, config: Exaone4Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        sliding = config.layer_sliding_window(layer_idx) is not None
        rope = config.sliding_window is None or sliding
        self.self_attn = Attention.for_layer(config, layer_idx, q_norm=RMSNorm(d, eps), k_norm=RMSNorm(d, eps),
                                             rope_key="rotary_emb" if rope else None)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Exaone4ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Exaone4DecoderLayer"]

    def __init__(self, config: Exaone4Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Exaone4DecoderLayer, norm=norm))


register_family(ModelFamily(("exaone4",), read_exaone4, Exaone4ForCausalLM))
