"""GLM-4 (0414): a decoder with four norms per layer (before and after attention, before
and after the MLP), a fused ``gate_up_proj`` MLP, q/k/v biases, and interleaved RoPE on
part of each head (`partial_rotary_factor`, 0.5 by default).

    layer: x + post_self_attn_layernorm(attn(input_layernorm(x))),
           then + post_mlp_layernorm(mlp(post_attention_layernorm(x)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import FusedGatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Glm4Config", "Glm4ForCausalLM", "Glm4DecoderLayer", "glm4_attention", "read_glm4"]

# Glm4Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 13696, "max_position_embeddings": 131072, "num_key_value_heads": 2,
             "head_dim": 128, "rms_norm_eps": 1.5625e-07, "pad_token_id": 151329,
             "eos_token_id": [151329, 151336, 151338]}


@dataclass(frozen=True, kw_only=True)
class Glm4Config(DecoderConfig):
    """A GLM-4 decoder. Example::

        cfg = read_glm4(json.load(open("GLM-4-9B-0414/config.json")))
        cfg.rope.partial_rotary_factor       # 0.5
    """

    attention_bias: bool = True


def read_glm4(d: dict[str, Any]) -> Glm4Config:
    """The `Glm4Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, rope_kw=dict(partial_rotary_factor=0.5))
    activation(fields["hidden_act"])
    return Glm4Config(**fields, attention_bias=bool(d.get("attention_bias", True)))


def glm4_attention(config: Glm4Config, layer_idx: int) -> Attention:
    """GLM-4's attention (``glm`` and ``glm4``): q/k/v biases as `attention_bias` says,
    interleaved RoPE on part of each head."""
    return Attention.for_layer(config, layer_idx, qkv_bias=config.attention_bias, interleaved_rope=True)


class Glm4DecoderLayer(DecoderLayer):
    def __init__(self, config: Glm4Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = glm4_attention(config, layer_idx)
        self.post_self_attn_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = FusedGatedMLP(h, config.intermediate_size, act=config.hidden_act)
        self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(DecoderForCausalLM):
    """A ``glm4`` causal LM; `layer` another generation's layer class (``glm``'s)."""

    _no_split_modules = ["Glm4DecoderLayer"]

    def __init__(self, config: Glm4Config, *, layer: type[DecoderLayer] = Glm4DecoderLayer) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, layer, norm=norm, interleaved_rope=True))


register_family(ModelFamily(("glm4",), read_glm4, Glm4ForCausalLM))
