"""gpt-oss: a mixture-of-experts decoder with attention sinks, alternating sliding-window
and full layers, and YaRN RoPE.

What differs from Llama:

* attention has q/k/v/o biases and one learned sink logit per head (``self_attn.sinks``)
  that joins every softmax row and is dropped after it;
* `layer_types` alternates ``sliding_attention`` (window `sliding_window`, 128) and
  ``full_attention``;
* the MLP is a mixture of experts: the router (``mlp.router``, a Linear with bias) picks
  the top-k logits and softmaxes over those k only; each expert is a clamped SwiGLU with
  biases, ``(clamp(up, ±limit) + 1) * gate * sigmoid(alpha * gate)`` with ``gate =
  min(gate, limit)``, where gate and up are the even and odd columns of ``x @
  gate_up_proj + bias``.

Checkpoint layout (what the hub's bf16 exports and transformers' `save_pretrained` hold):
the experts packed and transposed, ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` (gate and up
interleaved on the last axis), ``gate_up_proj_bias`` ``[E, 2I]``, ``down_proj`` ``[E, I, H]``,
``down_proj_bias`` ``[E, H]`` — the model keeps these as its parameters, under these
names, so a layer reads exactly its packed tensors. (The hub's original checkpoints are
MXFP4, ``*_blocks`` + ``*_scales``: decoded by `distload.checkpoint`, not here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import KVCache
from .common.attention import Attention
from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder, read_layer_types
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import RMSNorm
from .common.routing import run_experts
from .registry import ModelFamily, register_family

__all__ = ["GptOssConfig", "GptOssForCausalLM", "GptOssDecoderLayer", "GptOssMoE", "read_gpt_oss"]

# GptOssConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 2880, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "head_dim": 64, "num_key_value_heads": 8, "rope_theta": 150000.0}
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}


@dataclass(frozen=True, kw_only=True)
class GptOssConfig(DecoderConfig):
    """A gpt-oss decoder. Example::

        cfg = read_gpt_oss(json.load(open("gpt-oss-120b/config.json")))
        cfg.num_local_experts, cfg.layer_sliding_window(0), cfg.layer_sliding_window(1)  # 128, 128, None
    """

    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True


def _number(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be a positive number, not {value!r}")
    return float(value)


def read_gpt_oss(d: dict[str, Any]) -> GptOssConfig:
    """The `GptOssConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = dict(d)
    if not d.get("rope_scaling") and not d.get("rope_parameters"):
        d["rope_parameters"] = dict(_DEFAULT_ROPE)  # transformers' default for gpt-oss is YaRN
    fields = read_decoder(d, defaults=_DEFAULTS)
    if fields["hidden_act"] not in ("silu", "swish"):   # the clamped SwiGLU is fixed
        raise ValueError(f"hidden_act {fields['hidden_act']!r} is not supported for gpt_oss (only silu)")
    layers = fields["num_hidden_layers"]
    layer_types = read_layer_types(d, layers, [SLIDING if (i + 1) % 2 else FULL for i in range(layers)])
    window = d.get("sliding_window", 128)
    if window is not None:
        window = positive_int(d, "sliding_window")
    experts = positive_int(d, "num_local_experts", 128)
    top_k = positive_int(d, "num_experts_per_tok", 4)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")
    return GptOssConfig(**fields, layer_types=layer_types if window is not None else None,
                        sliding_window=window, num_local_experts=experts, num_experts_per_tok=top_k,
                        swiglu_alpha=_number(d, "swiglu_alpha", 1.702),
                        swiglu_limit=_number(d, "swiglu_limit", 7.0),
                        attention_bias=bool(d.get("attention_bias", True)))


class GptOssRouter(nn.Linear):
    """``mlp.router``: logits with a bias; the top-k of them, softmaxed among themselves."""

    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__(hidden, experts, bias=True)
        self.top_k = top_k

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, chosen = torch.topk(super().forward(flat), self.top_k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), chosen


class GptOssExperts(nn.Module):
    """The packed experts, under the checkpoint's names and layout (see the module doc)."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ self.down_proj[e] \
            + self.down_proj_bias[e]


class GptOssMoE(nn.Module):
    """``router`` and ``experts``; tells the planner what one token costs (its top-k
    experts, not all of them)."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.router = GptOssRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok)
        self.experts = GptOssExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router.route(flat)
        return run_experts(flat, self.experts.expert, weights, chosen).view(x.shape)

    def active_flops(self) -> float:
        h, two_i = self.experts.gate_up_proj.shape[1:]
        per_expert = 2.0 * h * two_i + 2.0 * (two_i // 2) * h
        return 2.0 * self.router.in_features * self.router.out_features + self.router.top_k * per_expert

    def active_activations(self) -> int:
        h, two_i = self.experts.gate_up_proj.shape[1:]
        return self.router.out_features + self.router.top_k * (two_i + h)


class GptOssDecoderLayer(DecoderLayer):
    def __init__(self, config: GptOssConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = RMSNorm(h, eps, style="olmo")
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias, sinks=True)
        self.post_attention_layernorm = RMSNorm(h, eps, style="olmo")
        self.mlp = GptOssMoE(config)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GptOssDecoderLayer"]

    def __init__(self, config: GptOssConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="olmo")
        super().__init__(config, DecoderModel(config, GptOssDecoderLayer, norm=norm))


# Its norms stay float32 under a float16 load (transformers' `_keep_in_fp32_modules`:
# input_layernorm, post_attention_layernorm, norm); the norm casts its output back.
register_family(ModelFamily(("gpt_oss",), read_gpt_oss, GptOssForCausalLM, keep_float32_fp16=(r"norm\.weight$",)))
