"""Granite (3.x): a Llama decoder with four multipliers from its config: the embeddings
are multiplied by `embedding_multiplier`, attention scores scaled by
`attention_multiplier` (instead of head_dim ** -0.5), each residual branch by
`residual_multiplier`, and the logits divided by `logits_scaling` (in `final_logits`, so
generation gets it too).
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

__all__ = ["GraniteConfig", "GraniteForCausalLM", "GraniteDecoderLayer", "read_granite"]

# GraniteConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "bos_token_id": 1,
             "eos_token_id": 2}
_MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


@dataclass(frozen=True, kw_only=True)
class GraniteConfig(DecoderConfig):
    """A Granite decoder. Example::

        cfg = read_granite(json.load(open("granite-3.1-8b-instruct/config.json")))
        cfg.logits_scaling      # 16.0
    """

    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0


def read_granite(d: dict[str, Any]) -> GraniteConfig:
    """The `GraniteConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    multipliers = {}
    for key in _MULTIPLIERS:
        value = d.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
            raise ValueError(f"{key} must be a non-zero number, not {value!r}")
        multipliers[key] = float(value)
    return GraniteConfig(**fields, **multipliers, attention_bias=bool(d.get("attention_bias", False)),
                         mlp_bias=bool(d.get("mlp_bias", False)))


class GraniteDecoderLayer(DecoderLayer):
    def __init__(self, config: GraniteConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                             scale=config.attention_multiplier)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self._add_mlp(config)
        self.residual_multiplier = config.residual_multiplier

    def _add_mlp(self, config: GraniteConfig) -> None:
        """The feed-forward modules (Granite MoE's layer adds its experts instead)."""
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)

    def _mlp(self, normed: torch.Tensor) -> torch.Tensor:
        return self.mlp(normed)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        m = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache) * m
        return x + self._mlp(self.post_attention_layernorm(x)) * m


class GraniteModel(DecoderModel):
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.config.embedding_multiplier


class GraniteForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GraniteDecoderLayer"]

    def __init__(self, config: GraniteConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, GraniteModel(config, GraniteDecoderLayer, norm=norm))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.config.logits_scaling


register_family(ModelFamily(("granite",), read_granite, GraniteForCausalLM))
