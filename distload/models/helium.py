"""Helium (Kyutai): Llama's decoder with RoPE on interleaved channel pairs, norm weights
applied to the float32 statistics before the cast (``"olmo"`` style), q/k/v biases from
`attention_bias` and an o_proj without bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["HeliumConfig", "HeliumForCausalLM", "HeliumDecoderLayer", "read_helium"]

# HeliumConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 7040, "max_position_embeddings": 4096, "rms_norm_eps": 1e-8, "rope_theta": 100000.0,
             "num_key_value_heads": 20, "head_dim": 128, "pad_token_id": 3, "bos_token_id": 1,
             "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class HeliumConfig(DecoderConfig):
    """A Helium decoder. Example::

        cfg = read_helium(json.load(open("helium-1-2b/config.json")))
    """

    attention_bias: bool = False
    mlp_bias: bool = False


def read_helium(d: dict[str, Any]) -> HeliumConfig:
    """The `HeliumConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    if fields["num_attention_heads"] * fields["head_dim"] != fields["hidden_size"]:
        # transformers' o_proj is hidden_size x hidden_size
        raise ValueError(f"head_dim ({fields['head_dim']}) x num_attention_heads "
                         f"({fields['num_attention_heads']}) must equal hidden_size "
                         f"({fields['hidden_size']}) for helium")
    return HeliumConfig(**fields, attention_bias=bool(d.get("attention_bias", False)),
                        mlp_bias=bool(d.get("mlp_bias", False)))


class HeliumDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: HeliumConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, style="olmo")
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=config.attention_bias,
                                             interleaved_rope=True)
        self.post_attention_layernorm = RMSNorm(h, eps, style="olmo")
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class HeliumForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["HeliumDecoderLayer"]

    def __init__(self, config: HeliumConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="olmo")
        super().__init__(config, DecoderModel(config, HeliumDecoderLayer, norm=norm, interleaved_rope=True))


register_family(ModelFamily(("helium",), read_helium, HeliumForCausalLM))
