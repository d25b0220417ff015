"""Command A MoE (``cohere2_moe``): Cohere 2's parallel block (one norm feeding attention
and MLP; interleaved RoPE in float32 on the sliding layers, none on the global ones) with
a mixture of experts on the layers `mlp_layer_types` marks ``"sparse"`` and a dense MLP of
`prefix_dense_intermediate_size` on the others (whose attention always applies RoPE
while `prefix_dense_sliding_window_pattern` is 1). The router takes the top-k logits and
softmaxes them (``expert_selection_fn: softmax``) or sigmoids them, renormalized with
`norm_topk_prob`; `num_shared_experts` shared experts (fused into one MLP) are summed with
the routed output or averaged with it (`shared_expert_combination_strategy`). The norms
are RMSNorm where `rms_norm_eps` is set, else Cohere's bias-free layer norm.

Checkpoints: one tensor per expert (what `save_pretrained` writes) or packed (`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.types import TensorMeta
from .cohere import CohereDecoderLayer, CohereForCausalLM
from .cohere2 import Cohere2Config, read_cohere2
from .common.config import positive_int, value_of
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import GatedMLP, LayerNormNoBias, RMSNorm
from .common.moe import unpack_experts
from .common.routing import ExpertMixture, run_experts
from .registry import ModelFamily, register_family

__all__ = ["Cohere2MoeConfig", "Cohere2MoeForCausalLM", "Cohere2MoeDecoderLayer", "read_cohere2_moe"]


@dataclass(frozen=True, kw_only=True)
class Cohere2MoeConfig(Cohere2Config):
    """A Command A MoE decoder. Example::

        cfg = read_cohere2_moe(json.load(open("config.json")))
        cfg.is_sparse(0), cfg.num_experts         # False, 128
    """

    sparse_layers: tuple[bool, ...] = ()
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    average_shared: bool = True
    sigmoid_router: bool = False
    norm_topk_prob: bool = True
    prefix_dense_intermediate_size: int | None = None
    dense_rope: bool = True
    rms_norm: bool = False   # RMSNorm (`rms_norm_eps` set) instead of Cohere's layer norm

    def is_sparse(self, layer_idx: int) -> bool:
        return self.sparse_layers[layer_idx]


def _choice(d: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = value_of(d, key, default)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def read_cohere2_moe(d: dict[str, Any]) -> Cohere2MoeConfig:
    """The `Cohere2MoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    rms_eps = d.get("rms_norm_eps")
    base = read_cohere2({"tie_word_embeddings": True, "logit_scale": 0.0625, **d, "rms_norm_eps": None})
    layers = base.num_hidden_layers
    dense = value_of(d, "first_k_dense_replace", 0)
    types = d.get("mlp_layer_types")
    if types is None:
        types = ["dense" if isinstance(dense, int) and i < dense else "sparse" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in ("dense", "sparse") for t in types):
        raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers "
                         f"(num_hidden_layers), not {types!r}")
    experts = positive_int(d, "num_experts", 8)
    top_k = positive_int(d, "num_experts_per_tok", 2)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
    shared = value_of(d, "num_shared_experts", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ValueError(f"num_shared_experts must be an integer >= 0, not {shared!r}")
    prefix = positive_int(d, "prefix_dense_intermediate_size", base.intermediate_size) if "dense" in types else None
    pattern = positive_int(d, "prefix_dense_sliding_window_pattern", 1)
    eps = {}
    if rms_eps is not None:
        if isinstance(rms_eps, bool) or not isinstance(rms_eps, (int, float)) or not rms_eps > 0:
            raise ValueError(f"rms_norm_eps must be a positive number or null, not {rms_eps!r}")
        eps = {"rms_norm_eps": float(rms_eps)}
    return Cohere2MoeConfig(
        **{f.name: getattr(base, f.name) for f in fields(base)} | eps, sparse_layers=tuple(t == "sparse" for t in types),
        num_experts=experts, num_experts_per_tok=top_k, num_shared_experts=shared,
        average_shared=_choice(d, "shared_expert_combination_strategy", "average", ("sum", "average")) == "average",
        sigmoid_router=_choice(d, "expert_selection_fn", "softmax", ("softmax", "sigmoid")) == "sigmoid",
        norm_topk_prob=bool(d.get("norm_topk_prob", True)), prefix_dense_intermediate_size=prefix,
        dense_rope=pattern == 1, rms_norm=rms_eps is not None)


class _Router(nn.Module):
    def __init__(self, config: Cohere2MoeConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k, self.sigmoid, self.norm = config.num_experts_per_tok, config.sigmoid_router, config.norm_topk_prob

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, chosen = torch.topk(F.linear(flat, self.weight), self.top_k, dim=-1)
        if self.sigmoid:
            scores = torch.sigmoid(scores)
            if self.norm:
                scores = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = torch.softmax(scores, dim=1, dtype=torch.float32)
        return scores.to(flat.dtype), chosen


class Cohere2Moe(ExpertMixture):
    """``gate`` (router), ``experts`` and optional ``shared_experts``."""

    def __init__(self, config: Cohere2MoeConfig) -> None:
        super().__init__()
        h, act = config.hidden_size, config.hidden_act
        self.gate = _Router(config)
        self.experts = nn.ModuleList(GatedMLP(h, config.intermediate_size, act=act) for _ in range(config.num_experts))
        if config.num_shared_experts:
            self.shared_experts = GatedMLP(h, config.intermediate_size * config.num_shared_experts, act=act)
        self.average = config.average_shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        out = run_experts(flat, self.experts, weights, chosen)
        shared = getattr(self, "shared_experts", None)
        if shared is not None:
            out = (out + shared(flat)) / 2 if self.average else out + shared(flat)
        return out.view(x.shape)


def _norm(config: Cohere2MoeConfig) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    return RMSNorm(h, eps) if config.rms_norm else LayerNormNoBias(h, eps)


class Cohere2MoeDecoderLayer(CohereDecoderLayer):
    """Cohere's parallel layer; RoPE on the sliding layers (and the dense ones, by the
    prefix pattern); a mixture of experts or a dense MLP."""

    def __init__(self, config: Cohere2MoeConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        sparse = config.is_sparse(layer_idx)
        if config.layer_sliding_window(layer_idx) is None and (sparse or not config.dense_rope):
            self.self_attn.rope_key = None
        self.input_layernorm = _norm(config)
        self.mlp = Cohere2Moe(config) if sparse else \
            GatedMLP(config.hidden_size, config.prefix_dense_intermediate_size, act=config.hidden_act)


class Cohere2MoeForCausalLM(CohereForCausalLM):
    _no_split_modules = ["Cohere2MoeDecoderLayer"]

    def __init__(self, config: Cohere2MoeConfig) -> None:
        DecoderForCausalLM.__init__(self, config, DecoderModel(config, Cohere2MoeDecoderLayer, norm=_norm(config),
                                                               interleaved_rope=True))

    @classmethod
    def checkpoint_tensors(cls, config: Cohere2MoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        return unpack_experts(tensors, block="mlp")


register_family(ModelFamily(("cohere2_moe",), read_cohere2_moe, Cohere2MoeForCausalLM))
