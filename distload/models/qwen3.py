"""Qwen3 (dense): a Llama-shaped decoder with a per-head RMSNorm on queries and keys
(before RoPE), an explicit head_dim (128 by default, whatever hidden / heads is), and
optional sliding-window layers.

    ids -> embed_tokens -> [input_layernorm -> self_attn (q_norm, k_norm per head) -> +residual
                            -> post_attention_layernorm -> mlp -> +residual] x N -> norm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.attention import Attention
from .common.config import DecoderConfig, qwen_layer_types, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer", "qwen_attention"]

# Qwen3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"head_dim": 128, "max_position_embeddings": 32768, "rope_theta": 10000.0}


@dataclass(frozen=True, kw_only=True)
class Qwen3Config(DecoderConfig):
    """A Qwen3 decoder. Example::

        cfg = read_qwen3(json.load(open("Qwen3-8B/config.json")))
    """

    attention_bias: bool = False


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
    return Attention.for_layer(config, layer_idx, qkv_bias=qkv_bias, o_bias=o_bias, **norms)


class Qwen3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        bias = config.attention_bias
        self.self_attn = qwen_attention(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class Qwen3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Qwen3DecoderLayer"]

    def __init__(self, config: Qwen3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Qwen3DecoderLayer, norm=norm))


register_family(ModelFamily(("qwen3",), read_qwen3, Qwen3ForCausalLM))
