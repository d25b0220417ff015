"""ERNIE 4.5 MoE: ERNIE 4.5's attention (interleaved RoPE rotated in float32, `use_bias` on
every projection, the head included) with mixture-of-experts MLPs on the layers from `moe_layer_start_index`
to `moe_layer_end_index`, every `moe_layer_interval`-th. The router is float32: softmax,
the top-k chosen on the probabilities plus a learnt per-expert bias
(``mlp.moe_statics.e_score_correction_bias`` ``[1, E]``), the unbiased probabilities of
those renormalized (a sum clamped at `moe_norm_min`); bias-free experts of
`moe_intermediate_size` and `moe_num_shared_experts` always-on experts fused into one MLP.

Checkpoints: one tensor per expert (what `save_pretrained` writes) or packed
(`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.types import TensorMeta
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, rename_tensors
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import unpack_experts
from .common.routing import ROUTER_FLOAT32, ExpertMixture, run_experts
from .ernie4_5 import Ernie45DecoderLayer
from .registry import ModelFamily, register_family

__all__ = ["Ernie45MoeConfig", "Ernie45MoeForCausalLM", "Ernie45MoeDecoderLayer", "read_ernie4_5_moe"]

# Ernie4_5_MoeConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 12288, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "num_key_value_heads": 4, "rope_theta": 500000.0, "tie_word_embeddings": True,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# transformers' in-memory name of the bias, where a checkpoint keeps that one
_NAMES = ((r"\.mlp\.gate\.moe_statics\.", ".mlp.moe_statics."),)


@dataclass(frozen=True, kw_only=True)
class Ernie45MoeConfig(DecoderConfig):
    """An ERNIE 4.5 MoE decoder. Example::

        cfg = read_ernie4_5_moe(json.load(open("ERNIE-4.5-21B-A3B-PT/config.json")))
        cfg.moe_num_experts, cfg.moe_k       # 64, 6
    """

    use_bias: bool = False
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_intermediate_size: int = 1536
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    def is_sparse(self, layer_idx: int) -> bool:
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (layer_idx + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= layer_idx <= end


def _int(d: dict[str, Any], key: str, alias: str, default: int, least: int) -> int:
    name = key if d.get(key) is not None else alias   # transformers' attribute_map: alias -> key
    value = d.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, not {value!r}")
    return value


def read_ernie4_5_moe(d: dict[str, Any]) -> Ernie45MoeConfig:
    """The `Ernie45MoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    if d.get("use_bias") is not None and not isinstance(d["use_bias"], bool):
        raise ValueError(f"use_bias must be true or false, not {d['use_bias']!r}")
    experts = _int(d, "moe_num_experts", "num_experts", 64, 1)
    top_k = _int(d, "moe_k", "num_experts_per_tok", 6, 1)
    if top_k > experts:
        raise ValueError(f"moe_k ({top_k}) exceeds moe_num_experts ({experts})")
    end = _int(d, "moe_layer_end_index", "moe_layer_end_index", -1, -1)
    norm_min = d.get("moe_norm_min", 1e-12)
    norm_min = 1e-12 if norm_min is None else norm_min
    if isinstance(norm_min, bool) or not isinstance(norm_min, (int, float)) or not norm_min > 0:
        raise ValueError(f"moe_norm_min must be a positive number, not {norm_min!r}")
    return Ernie45MoeConfig(
        **fields, use_bias=bool(d.get("use_bias", False)), moe_num_experts=experts, moe_k=top_k,
        moe_intermediate_size=positive_int(d, "moe_intermediate_size", 1536),
        moe_num_shared_experts=_int(d, "moe_num_shared_experts", "moe_num_shared_experts", 2, 0),
        moe_layer_start_index=_int(d, "moe_layer_start_index", "moe_layer_start_index", 1, 0),
        moe_layer_end_index=end, moe_layer_interval=positive_int(d, "moe_layer_interval", 1),
        moe_norm_min=float(norm_min))


class _Router(nn.Module):
    """``weight`` ``[E, H]``; chooses on softmax + the bias, weighs by the softmax."""

    def __init__(self, hidden: int, experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, hidden))
        self.top_k, self.norm_min = top_k, norm_min

    def forward(self, flat: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(flat.float(), self.weight.float()).softmax(dim=1, dtype=torch.float32)
        chosen = torch.topk(probs + bias.float().squeeze(), self.top_k, dim=-1)[1]
        weights = probs.gather(-1, chosen)
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min), chosen


class _Statics(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, experts), requires_grad=False)


class Ernie45Moe(ExpertMixture):
    """``gate`` (router), ``moe_statics`` (its bias), ``experts``, optional ``shared_experts``."""

    def __init__(self, config: Ernie45MoeConfig) -> None:
        super().__init__()
        h, act, n = config.hidden_size, config.hidden_act, config.moe_num_experts
        self.gate = _Router(h, n, config.moe_k, config.moe_norm_min)
        self.moe_statics = _Statics(n)
        self.experts = nn.ModuleList(GatedMLP(h, config.moe_intermediate_size, act=act) for _ in range(n))
        if config.moe_num_shared_experts:
            self.shared_experts = GatedMLP(h, config.moe_intermediate_size * config.moe_num_shared_experts,
                                           act=act, bias=config.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat, self.moe_statics.e_score_correction_bias)
        out = run_experts(flat, self.experts, weights.to(flat.dtype), chosen)
        shared = getattr(self, "shared_experts", None)
        return (out if shared is None else out + shared(flat)).view(x.shape)


class Ernie45MoeDecoderLayer(Ernie45DecoderLayer):
    """ERNIE 4.5's dense layer, with experts for the MLP on the sparse layers."""

    def _mlp(self, config: Ernie45MoeConfig, layer_idx: int) -> nn.Module:
        return Ernie45Moe(config) if config.is_sparse(layer_idx) else super()._mlp(config, layer_idx)


class Ernie45MoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Ernie45MoeDecoderLayer"]

    def __init__(self, config: Ernie45MoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Ernie45MoeDecoderLayer, norm=norm, interleaved_rope=True))
        if config.use_bias:   # the head has a bias too
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
            self.tie_weights()

    @classmethod
    def checkpoint_tensors(cls, config: Ernie45MoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Packed experts as byte ranges; the bias under its hub name."""
        return rename_tensors(unpack_experts(tensors, block="mlp"), _NAMES)


register_family(ModelFamily(("ernie4_5_moe",), read_ernie4_5_moe, Ernie45MoeForCausalLM,
                            keep_float32=ROUTER_FLOAT32))
