"""Apertus (Swiss AI): a Llama-shaped decoder with per-head RMSNorm on queries and keys
(before RoPE), norms named `attention_layernorm` / `feedforward_layernorm`, and a gateless
MLP, ``down_proj(xielu(up_proj(x)))``, whose xIELU activation has its own checkpoint
tensors (``mlp.act_fn.alpha_p``, ``alpha_n``, ``beta``, ``eps``). RoPE is llama3-scaled
by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import RMSNorm, UpDownMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["ApertusConfig", "ApertusForCausalLM", "ApertusDecoderLayer", "XIELU", "read_apertus"]

# ApertusConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 14336, "max_position_embeddings": 65536, "rms_norm_eps": 1e-5,
             "hidden_act": "xielu", "rope_theta": 12000000.0, "pad_token_id": 3, "bos_token_id": 1,
             "eos_token_id": 2}
_DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                 "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass(frozen=True, kw_only=True)
class ApertusConfig(DecoderConfig):
    """An Apertus decoder. Example::

        cfg = read_apertus(json.load(open("Apertus-8B-Instruct-2509/config.json")))
        cfg.hidden_act      # 'xielu'
    """

    attention_bias: bool = False


def read_apertus(d: dict[str, Any]) -> ApertusConfig:
    """The `ApertusConfig` of a config.json dict; ValueError naming an unsupported field."""
    if not d.get("rope_parameters") and not d.get("rope_scaling"):
        d = {**d, "rope_parameters": dict(_DEFAULT_ROPE)}
    fields = read_decoder(d, defaults=_DEFAULTS)
    if fields["hidden_act"] != "xielu":
        activation(fields["hidden_act"])
    return ApertusConfig(**fields, attention_bias=bool(d.get("attention_bias", False)))


class XIELU(nn.Module):
    """xIELU (transformers' Python path): ``a_p x² + b x`` for x > 0, else
    ``(expm1(min(x, eps)) - x) a_n + b x``, with ``a_p = softplus(alpha_p)`` and
    ``a_n = beta + softplus(alpha_n)``. All four are checkpoint tensors (`beta` and `eps`
    are buffers in transformers; parameters here, so that they load like any weight)."""

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8, beta: float = 0.5, eps: float = -1e-6) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.log(torch.expm1(torch.tensor(alpha_p))).unsqueeze(0))
        self.alpha_n = nn.Parameter(torch.log(torch.expm1(torch.tensor(alpha_n - beta))).unsqueeze(0))
        self.beta = nn.Parameter(torch.tensor(beta), requires_grad=False)
        self.eps = nn.Parameter(torch.tensor(eps), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x)


class ApertusDecoderLayer(DecoderLayer):
    def __init__(self, config: ApertusConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d, bias = config.hidden_size, config.rms_norm_eps, config.head_dim, config.attention_bias
        self.attention_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                             q_norm=RMSNorm(d, eps), k_norm=RMSNorm(d, eps))
        self.feedforward_layernorm = RMSNorm(h, eps)
        act = XIELU() if config.hidden_act == "xielu" else config.hidden_act
        self.mlp = UpDownMLP(h, config.intermediate_size, act=act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.attention_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.feedforward_layernorm(x))


class ApertusForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["ApertusDecoderLayer"]

    def __init__(self, config: ApertusConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, ApertusDecoderLayer, norm=norm))


register_family(ModelFamily(("apertus",), read_apertus, ApertusForCausalLM))
