"""MiniMax-M2: a decoder with RMSNorm on the whole query and key projections (over all
heads at once, before the split into heads, as OLMo 2 but with Llama's norm), partial RoPE
(`partial_rotary_factor`, or the released configs' `rotary_dim`) on the halves of the
rotated channels, and a mixture of experts in every layer (Mixtral's names and experts):
sigmoid scores, the top-k chosen with a learnt per-expert bias
(``block_sparse_moe.e_score_correction_bias``), the unbiased scores of those
renormalized and kept in float32.

Checkpoints: the hub's (``block_sparse_moe.experts.{e}.w1/w2/w3``, what `save_pretrained`
writes) or transformers 5's in-memory layout (``mlp.``, packed experts; `unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import RMSNorm, activation, linear_flops, linear_outputs
from .common.moe import unpack_experts
from .common.routing import run_experts
from .mixtral import MixtralExpert
from .registry import ModelFamily, register_family

__all__ = ["MiniMaxM2Config", "MiniMaxM2ForCausalLM", "MiniMaxM2DecoderLayer", "read_minimax_m2"]

# MiniMaxM2Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 1536, "max_position_embeddings": 196608, "rms_norm_eps": 1e-6,
             "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 5000000.0, "bos_token_id": 200034,
             "eos_token_id": 200020}


@dataclass(frozen=True, kw_only=True)
class MiniMaxM2Config(DecoderConfig):
    """A MiniMax-M2 decoder. Example::

        cfg = read_minimax_m2(json.load(open("MiniMax-M2/config.json")))
        cfg.num_local_experts, cfg.rope.partial_rotary_factor      # 256, 0.5
    """

    num_local_experts: int = 256
    num_experts_per_tok: int = 8


def read_minimax_m2(d: dict[str, Any]) -> MiniMaxM2Config:
    """The `MiniMaxM2Config` of a config.json dict; ValueError naming an unsupported field."""
    head_dim = d.get("head_dim") or _DEFAULTS["head_dim"]
    rope_kw = {}
    if d.get("rotary_dim") is not None:   # the released configs' name for the rotated width
        rotary = positive_int(d, "rotary_dim")
        if not isinstance(head_dim, int) or rotary > head_dim:
            raise ValueError(f"rotary_dim ({rotary}) must be at most head_dim ({head_dim})")
        rope_kw["partial_rotary_factor"] = rotary / head_dim
    fields = read_decoder(d, defaults=_DEFAULTS, rope_kw=rope_kw)
    activation(fields["hidden_act"])
    experts = positive_int(d, "num_local_experts", d.get("num_experts", 256))
    top_k = positive_int(d, "num_experts_per_tok", 8)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")
    return MiniMaxM2Config(**fields, num_local_experts=experts, num_experts_per_tok=top_k)


class MiniMaxM2Moe(nn.Module):
    """``gate`` (the router), ``e_score_correction_bias`` and ``experts`` (Mixtral's)."""

    def __init__(self, config: MiniMaxM2Config) -> None:
        super().__init__()
        h, n = config.hidden_size, config.num_local_experts
        self.gate = nn.Linear(h, n, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.experts = nn.ModuleList(MixtralExpert(config) for _ in range(n))
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(F.linear(flat.to(self.gate.weight.dtype), self.gate.weight).float())
        chosen = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return run_experts(flat, self.experts, weights, chosen).view(x.shape)

    def active_flops(self) -> float:
        return linear_flops(self.gate) + self.top_k * linear_flops(self.experts[0])

    def active_activations(self) -> int:
        return linear_outputs(self.gate) + self.top_k * linear_outputs(self.experts[0])


class MiniMaxM2DecoderLayer(DecoderLayer):
    def __init__(self, config: MiniMaxM2Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(
            config, layer_idx, q_norm=RMSNorm(config.num_attention_heads * d, eps),
            k_norm=RMSNorm(config.num_key_value_heads * d, eps), norm_full_width=True)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.block_sparse_moe = MiniMaxM2Moe(config)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MiniMaxM2ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["MiniMaxM2DecoderLayer"]

    def __init__(self, config: MiniMaxM2Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, MiniMaxM2DecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: MiniMaxM2Config, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """transformers 5's names (``mlp.``, packed experts) onto the hub's."""
        return unpack_experts(tensors, block="block_sparse_moe", names=("w1", "w3", "w2"),
                              packed_blocks=("mlp", "block_sparse_moe"))


register_family(ModelFamily(("minimax_m2",), read_minimax_m2, MiniMaxM2ForCausalLM))
