"""Arcee (AFM): Llama's decoder whose MLP has no gate, ``down_proj(relu²(up_proj(x)))``
by default; `attention_bias` covers q/k/v/o, `mlp_bias` the MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import RMSNorm, UpDownMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["ArceeConfig", "ArceeForCausalLM", "ArceeDecoderLayer", "read_arcee"]

# ArceeConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 18432, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "hidden_act": "relu2", "bos_token_id": 128000, "eos_token_id": 128001}


@dataclass(frozen=True, kw_only=True)
class ArceeConfig(DecoderConfig):
    """An Arcee decoder. Example::

        cfg = read_arcee(json.load(open("AFM-4.5B/config.json")))
        cfg.hidden_act      # 'relu2'
    """

    attention_bias: bool = False
    mlp_bias: bool = False


def read_arcee(d: dict[str, Any]) -> ArceeConfig:
    """The `ArceeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    return ArceeConfig(**fields, attention_bias=bool(d.get("attention_bias", False)),
                       mlp_bias=bool(d.get("mlp_bias", False)))


class ArceeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ArceeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = UpDownMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class ArceeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["ArceeDecoderLayer"]

    def __init__(self, config: ArceeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, ArceeDecoderLayer, norm=norm))


register_family(ModelFamily(("arcee",), read_arcee, ArceeForCausalLM))
