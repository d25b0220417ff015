"""Nemotron (NVIDIA Nemotron-3/4, Minitron): Llama's attention (one `attention_bias`
switch for q/k/v/o) with partial RoPE (0.5 by default), a gateless relu² MLP
(``down_proj(relu²(up_proj(x)))``) and "1P" layer norms, whose weight is stored minus one:
``layer_norm(x, weight + 1, bias)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import UpDownMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["NemotronConfig", "NemotronForCausalLM", "NemotronDecoderLayer", "LayerNorm1P", "read_nemotron"]

# NemotronConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 24576, "max_position_embeddings": 4096, "norm_eps": 1e-5,
             "hidden_act": "relu2", "bos_token_id": 2, "eos_token_id": 3}


@dataclass(frozen=True, kw_only=True)
class NemotronConfig(DecoderConfig):
    """A Nemotron decoder (`rms_norm_eps` holds `norm_eps`). Example::

        cfg = read_nemotron(json.load(open("Minitron-8B-Base/config.json")))
        cfg.rope.partial_rotary_factor        # 0.5
    """

    attention_bias: bool = False
    mlp_bias: bool = False


def read_nemotron(d: dict[str, Any]) -> NemotronConfig:
    """The `NemotronConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="norm_eps", rope_kw={"partial_rotary_factor": 0.5})
    activation(fields["hidden_act"])
    return NemotronConfig(**fields, attention_bias=bool(d.get("attention_bias", False)),
                          mlp_bias=bool(d.get("mlp_bias", False)))


class LayerNorm1P(nn.LayerNorm):
    """Layer norm with a zero-centred weight: ``layer_norm(x, weight + 1, bias)``, in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class NemotronDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: NemotronConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = LayerNorm1P(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = LayerNorm1P(h, eps=eps)
        self.mlp = UpDownMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class NemotronForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["NemotronDecoderLayer"]

    def __init__(self, config: NemotronConfig) -> None:
        norm = LayerNorm1P(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, NemotronDecoderLayer, norm=norm))


register_family(ModelFamily(("nemotron",), read_nemotron, NemotronForCausalLM))
