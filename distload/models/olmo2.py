"""OLMo 2: no pre-norms; RMSNorm after attention and after the MLP (inside the residual),
and RMSNorm on the whole query and key projections (over all heads at once, before they
are split into heads). Norm weights multiply the float32 statistics before the cast.

    layer: x + post_attention_layernorm(attn(x)), then + post_feedforward_layernorm(mlp(x))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Olmo2Config", "Olmo2ForCausalLM", "Olmo2DecoderLayer", "read_olmo2"]

# Olmo2Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "pad_token_id": 1, "eos_token_id": 50279}


@dataclass(frozen=True, kw_only=True)
class Olmo2Config(DecoderConfig):
    """An OLMo 2 decoder. Example::

        cfg = read_olmo2(json.load(open("OLMo-2-1124-7B/config.json")))
    """

    attention_bias: bool = False


def read_olmo2(d: dict[str, Any]) -> Olmo2Config:
    """The `Olmo2Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    return Olmo2Config(**fields, attention_bias=bool(d.get("attention_bias", False)))


class Olmo2DecoderLayer(DecoderLayer):
    def __init__(self, config: Olmo2Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.self_attn = Attention.for_layer(
            config, layer_idx, qkv_bias=bias, o_bias=bias, q_norm=RMSNorm(heads * d, eps, style="olmo"),
            k_norm=RMSNorm(kv_heads * d, eps, style="olmo"), norm_full_width=True)
        self.post_attention_layernorm = RMSNorm(h, eps, style="olmo")
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(h, eps, style="olmo")

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Olmo2DecoderLayer"]

    def __init__(self, config: Olmo2Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="olmo")
        super().__init__(config, DecoderModel(config, Olmo2DecoderLayer, norm=norm))


register_family(ModelFamily(("olmo2",), read_olmo2, Olmo2ForCausalLM))
