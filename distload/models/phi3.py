"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share its model type): a Llama-shaped decoder
whose checkpoint fuses the attention's q/k/v into one ``qkv_proj`` and the MLP's gate and
up into one ``gate_up_proj``, with optional partial rotary embeddings and su/longrope
scaling (short factors up to `original_max_position_embeddings`, long factors beyond it,
and an attention factor on cos/sin).

    ids -> embed_tokens -> [input_layernorm -> self_attn (qkv_proj) -> +residual
                            -> post_attention_layernorm -> mlp (gate_up_proj) -> +residual] x N
        -> norm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import FusedGatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["Phi3Config", "Phi3ForCausalLM", "Phi3DecoderLayer", "read_phi3"]

# Phi3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 8192, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}


@dataclass(frozen=True, kw_only=True)
class Phi3Config(DecoderConfig):
    """A Phi-3 decoder. Example::

        cfg = read_phi3(json.load(open("Phi-3-mini-128k-instruct/config.json")))
        cfg.rope.rope_type        # "longrope"
    """


def read_phi3(d: dict[str, Any]) -> Phi3Config:
    """The `Phi3Config` of a config.json dict; ValueError naming an unsupported field."""
    # transformers reads Phi-3's "su" and "yarn" scaling as longrope.
    fields = read_decoder(d, defaults=_DEFAULTS, rope_kw=dict(
        allowed=("default", "longrope"), aliases={"su": "longrope", "yarn": "longrope"}))
    activation(fields["hidden_act"])
    window = d.get("sliding_window")
    return Phi3Config(**fields, sliding_window=None if window is None else int(window))


class Phi3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, fused_qkv=True)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = FusedGatedMLP(h, config.intermediate_size, act=config.hidden_act)


class Phi3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Phi3DecoderLayer"]

    def __init__(self, config: Phi3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Phi3DecoderLayer, norm=norm))


register_family(ModelFamily(("phi3",), read_phi3, Phi3ForCausalLM))
