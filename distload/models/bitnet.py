"""BitNet (b1.58, unquantized weights): Llama's decoder with an RMSNorm on the heads'
concatenated outputs before ``o_proj`` (``self_attn.attn_sub_norm``) and one on the gated
MLP's product before ``down_proj`` (``mlp.ffn_sub_norm``); relu² gating by default.
Checkpoints with ternary-packed weights (``quantization_config`` ``bitnet``) are refused
by the loader, naming the method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["BitNetConfig", "BitNetForCausalLM", "BitNetDecoderLayer", "read_bitnet"]

# BitNetConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 6912, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "num_key_value_heads": 5, "hidden_act": "relu2", "rope_theta": 500000.0,
             "bos_token_id": 128000, "eos_token_id": 128001}


@dataclass(frozen=True, kw_only=True)
class BitNetConfig(DecoderConfig):
    """A BitNet decoder. Example::

        cfg = read_bitnet(json.load(open("config.json")))
    """

    attention_bias: bool = False


def read_bitnet(d: dict[str, Any]) -> BitNetConfig:
    """The `BitNetConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    if fields["num_attention_heads"] * fields["head_dim"] != fields["hidden_size"]:
        raise ValueError(f"head_dim ({fields['head_dim']}) x num_attention_heads ({fields['num_attention_heads']}) "
                         f"must equal hidden_size ({fields['hidden_size']}) for bitnet (attn_sub_norm spans it)")
    return BitNetConfig(**fields, attention_bias=bool(d.get("attention_bias", False)))


class BitNetAttention(Attention):
    """Llama's attention, its heads' outputs normalized (``attn_sub_norm``) before ``o_proj``."""

    def __init__(self, config: BitNetConfig, layer_idx: int) -> None:
        bias = config.attention_bias
        kw = dict(hidden=config.hidden_size, heads=config.num_attention_heads,
                  kv_heads=config.num_key_value_heads, head_dim=config.head_dim, layer_key=str(layer_idx),
                  qkv_bias=bias, o_bias=bias, rope_key="rotary_emb")
        super().__init__(**kw)
        self.attn_sub_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn_sub_norm(out))


class BitNetMLP(GatedMLP):
    """``down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))``."""

    def __init__(self, config: BitNetConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, act=config.hidden_act)
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ffn_sub_norm(self.act(self.gate_proj(x)) * self.up_proj(x)))


class BitNetDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: BitNetConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = BitNetAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = BitNetMLP(config)


class BitNetForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["BitNetDecoderLayer"]

    def __init__(self, config: BitNetConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, BitNetDecoderLayer, norm=norm))


register_family(ModelFamily(("bitnet",), read_bitnet, BitNetForCausalLM))
