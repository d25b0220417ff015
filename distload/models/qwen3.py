"""Qwen3 (dense): a Llama-shaped decoder with a per-head RMSNorm on queries and keys
(before RoPE), an explicit head_dim (128 by default, whatever hidden / heads is), and
optional sliding-window layers.

    ids -> embed_tokens -> [input_layernorm -> self_attn (q_norm, k_norm per head) -> +residual
                            -> post_attention_layernorm -> mlp -> +residual] x N -> norm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import FULL, SLIDING, DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer", "qwen_attention", "qwen_layer_types"]

# Qwen3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"head_dim": 128, "max_position_embeddings": 32768, "rope_theta": 10000.0}


@dataclass(frozen=True, kw_only=True)
class Qwen3Config(DecoderConfig):
    """A Qwen3 decoder. Example::

        cfg = read_qwen3(json.load(open("Qwen3-8B/config.json")))
    """

    attention_bias: bool = False


def qwen_layer_types(d: dict[str, Any], layers: int, *, every_layer: bool = False
                     ) -> tuple[int | None, tuple[str, ...] | None]:
    """(window, layer types) of a Qwen config: none unless `use_sliding_window`; then the
    config's `layer_types`, else (Qwen3) the layers from `max_window_layers` on slide, or
    (`every_layer`, Qwen3-MoE) all of them."""
    window = d.get("sliding_window", 4096)
    if not d.get("use_sliding_window", False) or window is None:
        return None, None
    if every_layer:
        return int(window), None
    layer_types = d.get("layer_types") or [
        SLIDING if i >= d.get("max_window_layers", 28) else FULL for i in range(layers)]
    return (int(window), tuple(layer_types)) if SLIDING in layer_types else (None, None)


def read_qwen3(d: dict[str, Any]) -> Qwen3Config:
    """The `Qwen3Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    window, layer_types = qwen_layer_types(d, fields["num_hidden_layers"])
    return Qwen3Config(**fields, sliding_window=window, layer_types=layer_types,
                       attention_bias=bool(d.get("attention_bias", False)))


def qwen_attention(config: DecoderConfig, layer_idx: int, *, qkv_bias: bool, o_bias: bool,
                   qk_norm: bool = True) -> Attention:
    """A Qwen attention: Qwen3's with a per-head RMSNorm on queries and keys (`qk_norm`),
    Qwen2's without."""
    d, eps = config.head_dim, config.rms_norm_eps
    norms = dict(q_norm=RMSNorm(d, eps), k_norm=RMSNorm(d, eps)) if qk_norm else {}
    return Attention(hidden=config.hidden_size, heads=config.num_attention_heads,
                     kv_heads=config.num_key_value_heads, head_dim=d, layer_key=str(layer_idx),
                     qkv_bias=qkv_bias, o_bias=o_bias, **norms,
                     sliding_window=config.layer_sliding_window(layer_idx), rope_key="rotary_emb")


class Qwen3DecoderLayer(DecoderLayer):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        bias = config.attention_bias
        self.self_attn = qwen_attention(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Qwen3DecoderLayer"]

    def __init__(self, config: Qwen3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Qwen3DecoderLayer, norm=norm))


register_family(ModelFamily(("qwen3",), read_qwen3, Qwen3ForCausalLM))
