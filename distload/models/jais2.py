"""Jais 2: Llama's attention (`attention_bias` on q/k/v/o, on by default) with layer norms
that have biases (`layer_norm_eps`) and a gateless MLP, ``down_proj(relu²(up_proj(x)))``
with biases (`mlp_bias`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import UpDownMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["Jais2Config", "Jais2ForCausalLM", "Jais2DecoderLayer", "read_jais2"]

# Jais2Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 26624, "max_position_embeddings": 8192, "layer_norm_eps": 1e-5,
             "hidden_act": "relu2", "bos_token_id": 0, "eos_token_id": 150024}


@dataclass(frozen=True, kw_only=True)
class Jais2Config(DecoderConfig):
    """A Jais 2 decoder (`rms_norm_eps` holds `layer_norm_eps`). Example::

        cfg = read_jais2(json.load(open("Jais-2-8B-Chat/config.json")))
    """

    attention_bias: bool = True
    mlp_bias: bool = True


def read_jais2(d: dict[str, Any]) -> Jais2Config:
    """The `Jais2Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps")
    activation(fields["hidden_act"])
    return Jais2Config(**fields, attention_bias=bool(d.get("attention_bias", True)),
                       mlp_bias=bool(d.get("mlp_bias", True)))


class Jais2DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Jais2Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = UpDownMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class Jais2ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Jais2DecoderLayer"]

    def __init__(self, config: Jais2Config) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Jais2DecoderLayer, norm=norm))


register_family(ModelFamily(("jais2",), read_jais2, Jais2ForCausalLM, unread=("rms_norm_eps",)))
