"""Seed-OSS: Llama's decoder with q/k/v biases (`attention_bias`), an optional o_proj bias
(`attention_out_bias`) and optional MLP biases (`mlp_bias`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["SeedOssConfig", "SeedOssForCausalLM", "SeedOssDecoderLayer", "read_seed_oss"]

# SeedOssConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 27648, "max_position_embeddings": 524288, "rms_norm_eps": 1e-6,
             "head_dim": 128, "num_key_value_heads": 8, "pad_token_id": 1, "bos_token_id": 0,
             "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class SeedOssConfig(DecoderConfig):
    """A Seed-OSS decoder. Example::

        cfg = read_seed_oss(json.load(open("Seed-OSS-36B-Instruct/config.json")))
    """

    attention_bias: bool = True
    attention_out_bias: bool = False
    mlp_bias: bool = False


def read_seed_oss(d: dict[str, Any]) -> SeedOssConfig:
    """The `SeedOssConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    return SeedOssConfig(**fields, attention_bias=bool(d.get("attention_bias", True)),
                         attention_out_bias=bool(d.get("attention_out_bias", False)),
                         mlp_bias=bool(d.get("mlp_bias", False)))


class SeedOssDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: SeedOssConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=config.attention_bias,
                                             o_bias=config.attention_out_bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class SeedOssForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["SeedOssDecoderLayer"]

    def __init__(self, config: SeedOssConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, SeedOssDecoderLayer, norm=norm))


register_family(ModelFamily(("seed_oss",), read_seed_oss, SeedOssForCausalLM))
