"""OLMo (1, and 1.7): Llama's decoder with layer norms that have no parameters at all
(mean and variance in float32, eps 1e-5 whatever the config says), one `attention_bias`
switch for q/k/v/o, an optional clamp of queries, keys and values (`clip_qkv`), and RoPE
applied in float32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["OlmoConfig", "OlmoForCausalLM", "OlmoDecoderLayer", "OlmoLayerNorm", "read_olmo"]

# OlmoConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "pad_token_id": 1,
             "eos_token_id": 50279}


@dataclass(frozen=True, kw_only=True)
class OlmoConfig(DecoderConfig):
    """An OLMo decoder. Example::

        cfg = read_olmo(json.load(open("OLMo-7B-0724-hf/config.json")))
        cfg.clip_qkv      # 8.0
    """

    attention_bias: bool = False
    clip_qkv: float | None = None


def read_olmo(d: dict[str, Any]) -> OlmoConfig:
    """The `OlmoConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    clip = d.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip_qkv must be a positive number or null, not {clip!r}")
    return OlmoConfig(**fields, attention_bias=bool(d.get("attention_bias", False)),
                      clip_qkv=None if clip is None else float(clip))


class OlmoLayerNorm(nn.Module):
    """Layer norm without weight or bias, in float32 (no checkpoint tensor)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.hidden,), None, None, eps=1e-5).to(x.dtype)


class OlmoDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: OlmoConfig, layer_idx: int) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        self.input_layernorm = OlmoLayerNorm(h)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                             clip_qkv=config.clip_qkv, rope_upcast=True)
        self.post_attention_layernorm = OlmoLayerNorm(h)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class OlmoForCausalLM(DecoderForCausalLM):
    # the final norm has no parameters: naming its class makes it a unit of its own, which
    # the plan places (on the last stage) like any other, instead of every stage running it
    _no_split_modules = ["OlmoDecoderLayer", "OlmoLayerNorm"]

    def __init__(self, config: OlmoConfig) -> None:
        super().__init__(config, DecoderModel(config, OlmoDecoderLayer, norm=OlmoLayerNorm(config.hidden_size)))


register_family(ModelFamily(("olmo",), read_olmo, OlmoForCausalLM))
