"""Ministral 3 (and Mistral 3's text model type): Mistral's decoder (a window on every
layer when `sliding_window` is set) with YaRN RoPE and Llama 4's long-context query
temperature: after RoPE, queries are multiplied by ``1 + beta * log(1 + floor(position /
original_max_position_embeddings))`` (``rope_parameters.llama_4_scaling_beta``), which
the rotary table computes with cos and sin from the same positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.rope import RotaryEmbedding
from .registry import ModelFamily, register_family

__all__ = ["Ministral3Config", "Ministral3ForCausalLM", "Ministral3DecoderLayer", "read_ministral3",
           "PositionScaledRotary"]

# Ministral3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 14336, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
             "head_dim": 128, "num_key_value_heads": 8, "pad_token_id": 11, "bos_token_id": 1,
             "eos_token_id": 2}
_DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                 "llama_4_scaling_beta": 0.1}


@dataclass(frozen=True, kw_only=True)
class Ministral3Config(DecoderConfig):
    """A Ministral 3 decoder: `query_scale_beta` and `query_scale_length` make the query
    temperature (beta 0: none). Example::

        cfg = read_ministral3(json.load(open("Ministral-3-8B/config.json"))["text_config"])
    """

    query_scale_beta: float = 0.0
    query_scale_length: int = 16384


def read_ministral3(d: dict[str, Any]) -> Ministral3Config:
    """The `Ministral3Config` of a config.json dict; ValueError naming an unsupported field."""
    if not d.get("rope_parameters") and not d.get("rope_scaling"):
        d = {**d, "rope_parameters": dict(_DEFAULT_ROPE)}
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    beta = params.get("llama_4_scaling_beta")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0):
        raise ValueError(f"rope_parameters.llama_4_scaling_beta must be a number >= 0, not {beta!r}")
    length = positive_int(params, "original_max_position_embeddings", fields["max_position_embeddings"])
    window = d.get("sliding_window")
    return Ministral3Config(**fields, sliding_window=None if window is None else positive_int(d, "sliding_window"),
                            query_scale_beta=float(beta or 0.0), query_scale_length=length)


class PositionScaledRotary(RotaryEmbedding):
    """A rotary table that also returns Llama 4's query temperature ``[B, 1, T, 1]``
    for the same positions (`Attention` multiplies the queries by it after RoPE)."""

    def __init__(self, config: Ministral3Config) -> None:
        super().__init__(config.rope, head_dim=config.head_dim, max_positions=config.max_position_embeddings)
        self.beta, self.length = config.query_scale_beta, config.query_scale_length

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin = super().forward(x, position_ids)
        scale = 1 + self.beta * torch.log(1 + torch.floor(position_ids.float() / self.length))
        return cos, sin, scale[:, None, :, None]


class Ministral3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Ministral3Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, rope_key="rotary_scaled")
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class Ministral3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Ministral3DecoderLayer"]

    def __init__(self, config: Ministral3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Ministral3DecoderLayer, norm=norm,
                                              extra_rotary={"rotary_scaled": PositionScaledRotary(config)}))


register_family(ModelFamily(("ministral3",), read_ministral3, Ministral3ForCausalLM))
