"""Mixtral: Mistral's decoder with a sparse mixture of experts in every layer
(`num_local_experts` SwiGLU experts, `num_experts_per_tok` of them per token, routing
weights renormalized and kept in float32), and a sliding window on every layer when
`sliding_window` is set.

Weight names are the hub's (``block_sparse_moe.gate``, ``block_sparse_moe.experts.{e}.w1``
(gate), ``w3`` (up), ``w2`` (down)), which transformers 5's `save_pretrained` writes too.
A checkpoint in transformers 5's in-memory layout (``mlp.gate``, packed
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj``) is mapped onto
them, each expert a byte range of the packed tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import RMSNorm, activation
from .common.moe import SparseMoE, unpack_experts
from .registry import ModelFamily, register_family

__all__ = ["MixtralConfig", "MixtralForCausalLM", "MixtralDecoderLayer", "read_mixtral"]

# MixtralConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 14336, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
             "num_key_value_heads": 8, "rope_theta": 1e6}


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(DecoderConfig):
    """A Mixtral decoder. Example::

        cfg = read_mixtral(json.load(open("Mixtral-8x7B-v0.1/config.json")))
        cfg.num_local_experts, cfg.num_experts_per_tok     # 8, 2
    """

    num_local_experts: int = 8
    num_experts_per_tok: int = 2


def read_mixtral(d: dict[str, Any]) -> MixtralConfig:
    """The `MixtralConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    window = d.get("sliding_window")
    return MixtralConfig(**fields, sliding_window=None if window is None else int(window),
                         num_local_experts=positive_int(d, "num_local_experts", d.get("num_experts", 8)),
                         num_experts_per_tok=positive_int(d, "num_experts_per_tok", 2))


class MixtralExpert(nn.Module):
    """``w2(act(w1(x)) * w3(x))``."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MixtralDecoderLayer(DecoderLayer):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.block_sparse_moe = SparseMoE(
            hidden=h, experts=[MixtralExpert(config) for _ in range(config.num_local_experts)],
            top_k=config.num_experts_per_tok, norm_topk_prob=True, float32_weights=True)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["MixtralDecoderLayer"]

    def __init__(self, config: MixtralConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, MixtralDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: MixtralConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """transformers 5's names (``mlp.``, packed experts) onto the hub's."""
        unpacked = unpack_experts(tensors, block="block_sparse_moe", names=("w1", "w3", "w2"),
                                  packed_blocks=("mlp", "block_sparse_moe"))
        return super().checkpoint_tensors(config, unpacked)


register_family(ModelFamily(("mixtral",), read_mixtral, MixtralForCausalLM))
