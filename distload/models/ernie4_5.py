"""ERNIE 4.5 (dense): Llama's decoder with RoPE on interleaved channel pairs, rotated in
float32, and one `use_bias` switch for every projection (attention and MLP); tied
embeddings by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Ernie45Config", "Ernie45ForCausalLM", "Ernie45DecoderLayer", "read_ernie4_5"]

# Ernie4_5Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 3072, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "head_dim": 128, "num_key_value_heads": 2, "rope_theta": 500000.0,
             "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class Ernie45Config(DecoderConfig):
    """An ERNIE 4.5 dense decoder. Example::

        cfg = read_ernie4_5(json.load(open("ERNIE-4.5-0.3B-PT/config.json")))
    """

    use_bias: bool = False


def read_ernie4_5(d: dict[str, Any]) -> Ernie45Config:
    """The `Ernie45Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    if d.get("use_bias") is not None and not isinstance(d["use_bias"], bool):
        raise ValueError(f"use_bias must be true or false, not {d['use_bias']!r}")
    return Ernie45Config(**fields, use_bias=bool(d.get("use_bias", False)))


class Ernie45DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Ernie45Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.use_bias
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                             interleaved_rope=True, rope_upcast=True)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = self._mlp(config, layer_idx)

    def _mlp(self, config: Ernie45Config, layer_idx: int) -> nn.Module:
        """The dense MLP (ERNIE 4.5 MoE's layer puts its experts here on sparse layers)."""
        return GatedMLP(config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=config.use_bias)


class Ernie45ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Ernie45DecoderLayer"]

    def __init__(self, config: Ernie45Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Ernie45DecoderLayer, norm=norm, interleaved_rope=True))


register_family(ModelFamily(("ernie4_5",), read_ernie4_5, Ernie45ForCausalLM))
