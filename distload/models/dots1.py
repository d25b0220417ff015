"""dots.llm1: Qwen3's attention (per-head q/k RMSNorms; sliding windows on the layers
`layer_types` marks, by default those from `max_window_layers` on) with DeepSeek-V3's
mixture of experts after `first_k_dense_replace` dense layers: sigmoid ``noaux_tc``
routing with the learnt bias over `n_group` groups, the weights renormalized
(`norm_topk_prob`) and scaled (`routed_scaling_factor`), shared experts fused into one
MLP (`common.routing`).

Checkpoints: one tensor per expert (what `save_pretrained` writes) or packed
(`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.config import (FULL, SLIDING, DecoderConfig, int_at_least, positive_int, positive_number, read_decoder,
                             read_layer_types)
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import unpack_experts
from .common.routing import ROUTER_FLOAT32, check_grouped_routing, noaux_tc_experts
from .qwen3 import qwen_attention
from .registry import ModelFamily, register_family

__all__ = ["Dots1Config", "Dots1ForCausalLM", "Dots1DecoderLayer", "read_dots1"]

# Dots1Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 10944, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}


@dataclass(frozen=True, kw_only=True)
class Dots1Config(DecoderConfig):
    """A dots.llm1 decoder. Example::

        cfg = read_dots1(json.load(open("dots.llm1.inst/config.json")))
        cfg.n_routed_experts, cfg.num_experts_per_tok      # 128, 6
    """

    attention_bias: bool = False
    n_routed_experts: int = 1
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 1408
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


def read_dots1(d: dict[str, Any]) -> Dots1Config:
    """The `Dots1Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    window = d.get("sliding_window", 4096)
    window = None if window is None else positive_int(d, "sliding_window", 4096)
    start = int_at_least(d, "max_window_layers", 62, 0)
    layer_types = read_layer_types(d, layers, [SLIDING if window is not None and i >= start else FULL
                                               for i in range(layers)])
    dense = int_at_least(d, "first_k_dense_replace", 0, 0)
    scaling = positive_number(d, "routed_scaling_factor", 1.0)
    moe = {}
    if dense < layers:   # transformers has no defaults for these: a model with experts names them
        for key in ("n_routed_experts", "num_experts_per_tok"):
            if d.get(key) is None:
                raise ValueError(f"config.json of a dots1 model with experts lacks {key}")
        moe = dict(n_routed_experts=int_at_least(d, "n_routed_experts", None, 1),
                   num_experts_per_tok=int_at_least(d, "num_experts_per_tok", None, 1),
                   n_shared_experts=int_at_least(d, "n_shared_experts", 0, 0),
                   n_group=int_at_least(d, "n_group", 1, 1), topk_group=int_at_least(d, "topk_group", 1, 1))
        check_grouped_routing(method="noaux_tc", experts=moe["n_routed_experts"],
                              top_k=moe["num_experts_per_tok"], groups=moe["n_group"], topk_group=moe["topk_group"])
    if d.get("norm_topk_prob") is not None and not isinstance(d["norm_topk_prob"], bool):
        raise ValueError(f"norm_topk_prob must be true or false, not {d['norm_topk_prob']!r}")
    return Dots1Config(**fields, sliding_window=window, layer_types=layer_types, **moe,
                       attention_bias=bool(d.get("attention_bias", False)),
                       moe_intermediate_size=positive_int(d, "moe_intermediate_size", 1408),
                       first_k_dense_replace=dense, norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       routed_scaling_factor=float(scaling))


class Dots1DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Dots1Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, act, bias = config.hidden_size, config.rms_norm_eps, config.hidden_act, config.attention_bias
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = qwen_attention(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = noaux_tc_experts(config, experts=config.n_routed_experts, shared_experts=config.n_shared_experts) \
            if config.is_sparse(layer_idx) else GatedMLP(h, config.intermediate_size, act=act)


class Dots1ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Dots1DecoderLayer"]

    def __init__(self, config: Dots1Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Dots1DecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: Dots1Config, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        return unpack_experts(tensors, block="mlp")


register_family(ModelFamily(("dots1",), read_dots1, Dots1ForCausalLM, keep_float32=ROUTER_FLOAT32))
