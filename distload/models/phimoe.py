"""Phi-3.5-MoE (``phimoe``): Mixtral's layout (``block_sparse_moe.gate``, experts
``w1``/``w2``/``w3``) with layer norms that have biases, q/k/v/o biases
(`attention_bias`), an optional head bias (`lm_head_bias`), a window on every layer when
`sliding_window` is set, and SparseMixer routing at inference: the best expert, then the
best of the rest, each weighted by a softmax over the experts whose logit lies within
``2 * router_jitter_noise`` (relative) of that pick's; always two experts per token.

Its longrope RoPE uses the short factors at every length (transformers computes them
without the sequence length) and scales cos/sin by `short_mscale`, or `long_mscale` for a
call whose positions reach past `original_max_position_embeddings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder, value_of
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import activation, linear_flops, linear_outputs
from .common.moe import unpack_experts
from .common.rope import RotaryEmbedding
from .common.routing import run_experts
from .mixtral import MixtralExpert
from .registry import ModelFamily, register_family

__all__ = ["PhimoeConfig", "PhimoeForCausalLM", "PhimoeDecoderLayer", "read_phimoe", "sparsemixer"]

# PhimoeConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 6400, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
             "num_key_value_heads": 8, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class PhimoeConfig(DecoderConfig):
    """A Phi-3.5-MoE decoder (`rms_norm_eps` is its layer norms' epsilon). Example::

        cfg = read_phimoe(json.load(open("Phi-3.5-MoE-instruct/config.json")))
        cfg.num_local_experts, cfg.rope.rope_type      # 16, 'longrope'
    """

    num_local_experts: int = 16
    router_jitter_noise: float = 0.01
    attention_bias: bool = False
    lm_head_bias: bool = False
    short_mscale: float = 1.0
    long_mscale: float = 1.0


def _number(d: dict[str, Any], key: str, default: float, field: str | None = None) -> float:
    value = value_of(d, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{field or key} must be a number >= 0, not {value!r}")
    return float(value)


def read_phimoe(d: dict[str, Any]) -> PhimoeConfig:
    """The `PhimoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, rope_kw=dict(allowed=("default", "longrope")))
    activation(fields["hidden_act"])
    rope, mscales = fields["rope"], {}
    if rope.rope_type == "longrope":
        params = d.get("rope_scaling") or d.get("rope_parameters") or {}
        mscales = {k: _number(params, k, None, f"rope_parameters.{k}") for k in ("short_mscale", "long_mscale")}
        fields["rope"] = replace(rope, long_factor=rope.short_factor)   # the short factors at every length
    experts = d.get("num_local_experts", 16)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 2:
        raise ValueError(f"num_local_experts must be an integer >= 2 (two experts per token), not {experts!r}")
    for key in ("attention_bias", "lm_head_bias"):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise ValueError(f"{key} must be true or false, not {d[key]!r}")
    window = d.get("sliding_window")
    return PhimoeConfig(**fields, sliding_window=None if window is None else int(window), num_local_experts=experts,
                        router_jitter_noise=_number(d, "router_jitter_noise", 0.01),
                        attention_bias=bool(d.get("attention_bias", False)),
                        lm_head_bias=bool(d.get("lm_head_bias", False)), **mscales)


def _pick(scores: torch.Tensor, choice: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of `choice` (scores with the excluded experts at -inf) and its weight: the
    softmax over the experts of `choice` within ``2 * eps`` (relative) of it."""
    best, index = choice.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    gates = choice.masked_fill((best - scores) / factor > 2 * eps, float("-inf"))
    return torch.softmax(gates, dim=-1).gather(-1, index), index


def sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's inference routing of router logits `scores` ``[N, E]``: (weights, experts)
    ``[N, 2]``, as transformers' `sparsemixer` computes them outside training."""
    w1, e1 = _pick(scores, scores, eps)
    w2, e2 = _pick(scores, torch.scatter(scores, -1, e1, float("-inf")), eps)
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


class PhimoeMoe(nn.Module):
    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(config) for _ in range(config.num_local_experts))
        self.eps = config.router_jitter_noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = sparsemixer(self.gate(flat), self.eps)
        return run_experts(flat, self.experts, weights, chosen).view(x.shape)

    def active_flops(self) -> float:
        return linear_flops(self.gate) + 2 * linear_flops(self.experts[0])

    def active_activations(self) -> int:
        return linear_outputs(self.gate) + 2 * linear_outputs(self.experts[0])


class PhimoeDecoderLayer(DecoderLayer):
    def __init__(self, config: PhimoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.block_sparse_moe = PhimoeMoe(config)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class PhimoeRotary(RotaryEmbedding):
    """Longrope's short factors, cos/sin scaled by `short_mscale` or, for a call past the
    pretraining length, `long_mscale`."""

    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__(config.rope, head_dim=config.head_dim, max_positions=config.max_position_embeddings)
        self.mscales = (config.short_mscale, config.long_mscale)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        long = int(position_ids.max()) + 1 > self.rope.original_max_position_embeddings
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), -1)
        scale = self.mscales[long]
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


class PhimoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["PhimoeDecoderLayer"]

    def __init__(self, config: PhimoeConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        longrope = config.rope.rope_type == "longrope"
        extra = {"rotary_emb": PhimoeRotary(config)} if longrope else {}
        super().__init__(config, DecoderModel(config, PhimoeDecoderLayer, norm=norm, extra_rotary=extra))
        if config.lm_head_bias:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
            self.tie_weights()

    @classmethod
    def checkpoint_tensors(cls, config: PhimoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """transformers 5's in-memory names (``mlp.``, ``router``, packed experts) onto the hub's."""
        renamed = rename_tensors(tensors, ((r"\.mlp\.router\.", ".mlp.gate."),))
        return unpack_experts(renamed, block="block_sparse_moe", names=("w1", "w3", "w2"),
                              packed_blocks=("mlp", "block_sparse_moe"))


register_family(ModelFamily(("phimoe",), read_phimoe, PhimoeForCausalLM))
