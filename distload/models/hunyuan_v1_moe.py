"""HunYuan MoE (V1, Hunyuan-A13B): HunYuan dense's attention (q/k norms after RoPE) with a
mixture of experts in every layer: a float32 softmax router (``mlp.gate.wg``), top-k
renormalized, plus an always-on ``shared_mlp``; experts and shared MLP all of
`intermediate_size`. `moe_topk` may differ per layer (a list).

Checkpoints: one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, what
`save_pretrained` writes) or packed (``mlp.experts.gate_up_proj``; `unpack_experts`).
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
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation, linear_flops, linear_outputs
from .common.moe import unpack_experts
from .common.routing import run_experts
from .common.rope import RopeParams
from .hunyuan_v1_dense import hunyuan_attention, hunyuan_tensors, read_hunyuan_rope
from .registry import ModelFamily, register_family

__all__ = ["HunYuanMoeConfig", "HunYuanMoeForCausalLM", "HunYuanMoeDecoderLayer", "HunYuanMoe",
           "read_hunyuan_moe"]

# HunYuanMoEV1Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class HunYuanMoeConfig(DecoderConfig):
    """A HunYuan MoE decoder: `moe_topk` has one entry per layer. Example::

        cfg = read_hunyuan_moe(json.load(open("Hunyuan-A13B-Instruct/config.json")))
        cfg.num_experts, cfg.moe_topk[0]     # 64, 8
    """

    attention_bias: bool = False
    num_experts: int = 1
    moe_topk: tuple[int, ...] = ()


def read_hunyuan_moe(d: dict[str, Any]) -> HunYuanMoeConfig:
    """The `HunYuanMoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, rope=RopeParams())
    activation(fields["hidden_act"])
    rope = read_hunyuan_rope(d, fields["head_dim"], fields["max_position_embeddings"])
    experts = positive_int(d, "num_experts", 1)
    layers = fields["num_hidden_layers"]
    topk = d.get("moe_topk", 1)
    if isinstance(topk, list):
        if len(topk) < layers:
            raise ValueError(f"moe_topk lists {len(topk)} entries for {layers} layers (num_hidden_layers)")
        ks = tuple(positive_int({"moe_topk": k}, "moe_topk") for k in topk[:layers])
    else:
        ks = (positive_int(d, "moe_topk", 1),) * layers
    if max(ks) > experts:
        raise ValueError(f"moe_topk ({max(ks)}) exceeds num_experts ({experts})")
    return HunYuanMoeConfig(**fields | {"rope": rope}, attention_bias=bool(d.get("attention_bias", False)),
                            num_experts=experts, moe_topk=ks)


class _Router(nn.Module):
    """``wg`` (float32 in transformers, whatever the model's dtype): softmax, top-k,
    renormalized; returns float32 (weights, chosen experts)."""

    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden, experts, bias=False)
        self.top_k = top_k

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(flat.float(), self.wg.weight.float()).softmax(dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen


class HunYuanMoe(nn.Module):
    """``gate`` (the router), ``experts`` (one `GatedMLP` each) and ``shared_mlp`` (every token)."""

    def __init__(self, config: HunYuanMoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, inter, act = config.hidden_size, config.intermediate_size, config.hidden_act
        self.gate = _Router(h, config.num_experts, config.moe_topk[layer_idx])
        self.experts = nn.ModuleList(GatedMLP(h, inter, act=act) for _ in range(config.num_experts))
        self.shared_mlp = GatedMLP(h, inter, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        return run_experts(flat, self.experts, weights, chosen).view(x.shape) + self.shared_mlp(x)

    def active_flops(self) -> float:
        """Per-token FLOPs: router, shared MLP and `top_k` experts."""
        k = self.gate.top_k
        return linear_flops(self.gate) + linear_flops(self.shared_mlp) + k * linear_flops(self.experts[0])

    def active_activations(self) -> int:
        k = self.gate.top_k
        return linear_outputs(self.gate) + linear_outputs(self.shared_mlp) + k * linear_outputs(self.experts[0])


class HunYuanMoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: HunYuanMoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = hunyuan_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = HunYuanMoe(config, layer_idx)


class HunYuanMoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["HunYuanMoeDecoderLayer"]

    def __init__(self, config: HunYuanMoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, HunYuanMoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: HunYuanMoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        return hunyuan_tensors(unpack_experts(tensors, block="mlp"))


# the router is built in float32 by transformers (`wg`, dtype=torch.float32)
register_family(ModelFamily(("hunyuan_v1_moe",), read_hunyuan_moe, HunYuanMoeForCausalLM,
                            keep_float32=(r"\.mlp\.gate\.wg\.weight$",)))
