"""DeepSeek-V2 (and V2-Lite, V2.5): multi-head latent attention (`common.mla`) and, after
`first_k_dense_replace` dense layers, a mixture of `n_routed_experts` experts with
`n_shared_experts` shared ones (`common.routing`: softmax routing, ``greedy`` or
``group_limited_greedy`` over `n_group` groups, weights times `routed_scaling_factor`).

RoPE acts on the `qk_rope_head_dim` decoupled channels only, as a complex product of
channel pairs (in float32); YaRN's `mscale_all_dim` also scales the softmax. The KV cache
keeps the latent (`kv_lora_rank + qk_rope_head_dim` per token), not per-head K/V.

As in transformers 5.25, the routing weights are not renormalized (V2's `norm_topk_prob`
is not read: its released configs set it false). DeepSeek-V3 (`deepseek_v3.py`) reuses
these parts.

Checkpoints: the hub's one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, what
transformers' `save_pretrained` writes) or packed experts (``mlp.experts.gate_up_proj``),
each expert a byte range of those.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from ..log import logger
from .common.config import DecoderConfig, int_at_least, positive_int, positive_number, read_decoder, value_of
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.mla import LatentAttention, mla_softmax_scale
from .common.moe import unpack_experts
from .common.routing import ROUTER_FLOAT32, GroupedTopKRouter, RoutedExperts, check_grouped_routing
from .registry import ModelFamily, register_family

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "DeepseekDecoderLayer", "read_deepseek_v2",
           "read_deepseek"]

# transformers 5's DeepseekV2Config defaults for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "n_routed_experts": 64,
             "n_shared_experts": 2, "moe_intermediate_size": 1407, "kv_lora_rank": 512,
             "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
             "first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "topk_method": "greedy",
             "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class DeepseekConfig(DecoderConfig):
    """A DeepSeek-V2 or V3 decoder (`head_dim` is `qk_rope_head_dim`: the RoPE table's
    width). Example::

        cfg = read_deepseek_v2(json.load(open("DeepSeek-V2-Lite/config.json")))
        cfg.is_sparse(0), cfg.kv_lora_rank          # False, 512
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    topk_method: str
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_interleave: bool = True
    rope_complex: bool = True        # V2: rotation in float32 (a complex product)

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has the mixture of experts (else a dense MLP)."""
        return layer_idx >= self.first_k_dense_replace


def read_deepseek(d: dict[str, Any], *, defaults: dict[str, Any], method: str,
                  **switches: Any) -> DeepseekConfig:
    """The `DeepseekConfig` of a config.json dict with the version's `defaults`; `method`
    is the routing when the config names none; `switches` are the version's own fields."""
    d = dict(d)
    d.pop("head_dim", None)   # derived: the rope width (transformers overwrites it too)
    rope_dim = int_at_least(d, "qk_rope_head_dim", defaults["qk_rope_head_dim"], 2)
    if rope_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be even (RoPE turns channel pairs), not {rope_dim}")
    fields = read_decoder(d, defaults={**defaults, "head_dim": rope_dim})
    activation(fields["hidden_act"])
    fields["num_key_value_heads"] = fields["num_attention_heads"]  # MLA: every head reads the latent
    q_lora = d.get("q_lora_rank", defaults["q_lora_rank"])
    if q_lora is not None:
        q_lora = int_at_least(d, "q_lora_rank", None, 1)
    experts = int_at_least(d, "n_routed_experts", d.get("num_local_experts", defaults["n_routed_experts"]), 1)
    topk_method = value_of(d, "topk_method", method)
    if not isinstance(topk_method, str):
        raise ValueError(f"topk_method must name a routing method, not {topk_method!r}")
    grouped = topk_method != "greedy"
    scaling = positive_number(d, "routed_scaling_factor", defaults["routed_scaling_factor"])
    for key in ("attention_bias", "mlp_bias", "norm_topk_prob", "rope_interleave"):
        value = d.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, not {value!r}")
    config = DeepseekConfig(
        **fields, q_lora_rank=q_lora,
        kv_lora_rank=int_at_least(d, "kv_lora_rank", defaults["kv_lora_rank"], 1),
        qk_nope_head_dim=int_at_least(d, "qk_nope_head_dim", defaults["qk_nope_head_dim"], 0),
        qk_rope_head_dim=rope_dim, v_head_dim=int_at_least(d, "v_head_dim", defaults["v_head_dim"], 1),
        n_routed_experts=experts,
        n_shared_experts=int_at_least(d, "n_shared_experts", defaults["n_shared_experts"], 0),
        num_experts_per_tok=positive_int(d, "num_experts_per_tok", defaults.get("num_experts_per_tok")),
        moe_intermediate_size=int_at_least(d, "moe_intermediate_size", defaults["moe_intermediate_size"], 1),
        first_k_dense_replace=int_at_least(d, "first_k_dense_replace", defaults["first_k_dense_replace"], 0),
        topk_method=topk_method,
        n_group=int_at_least(d, "n_group", 1, 1) if grouped else 1,
        topk_group=int_at_least(d, "topk_group", 1, 1) if grouped else 1,
        norm_topk_prob=bool(d.get("norm_topk_prob", defaults.get("norm_topk_prob", False))),
        routed_scaling_factor=float(scaling),
        attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
        **switches)
    if config.first_k_dense_replace < config.num_hidden_layers:  # checked now, not when a stage is built
        check_grouped_routing(method=config.topk_method, experts=config.n_routed_experts,
                              top_k=config.num_experts_per_tok, groups=config.n_group,
                              topk_group=config.topk_group)
    return config


def read_deepseek_v2(d: dict[str, Any]) -> DeepseekConfig:
    """The `DeepseekConfig` of a deepseek_v2 config.json dict; ValueError naming a field."""
    return read_deepseek({**d, "norm_topk_prob": False}, defaults=_DEFAULTS, method="greedy",
                         rope_interleave=True, rope_complex=True)


def _router(config: DeepseekConfig) -> GroupedTopKRouter:
    return GroupedTopKRouter(hidden=config.hidden_size, experts=config.n_routed_experts,
                             top_k=config.num_experts_per_tok, method=config.topk_method,
                             groups=config.n_group, topk_group=config.topk_group,
                             norm_topk_prob=config.norm_topk_prob, scaling=config.routed_scaling_factor)


class DeepseekDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, act = config.hidden_size, config.rms_norm_eps, config.hidden_act
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = LatentAttention(
            hidden=h, heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
            layer_key=str(layer_idx), bias=config.attention_bias,
            scale=mla_softmax_scale(config.qk_nope_head_dim + config.qk_rope_head_dim, config.rope),
            interleaved_rope=config.rope_interleave, rope_upcast=config.rope_complex)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if config.is_sparse(layer_idx):
            experts = [GatedMLP(h, config.moe_intermediate_size, act=act)
                       for _ in range(config.n_routed_experts)]
            shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act=act,
                              bias=config.mlp_bias) if config.n_shared_experts else None
            self.mlp = RoutedExperts(_router(config), experts, shared=shared)
        else:
            self.mlp = GatedMLP(h, config.intermediate_size, act=act, bias=config.mlp_bias)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["DeepseekDecoderLayer"]

    def __init__(self, config: DeepseekConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, DeepseekDecoderLayer, norm=norm,
                                              interleaved_rope=config.rope_interleave))

    @classmethod
    def checkpoint_tensors(cls, config: DeepseekConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Packed experts become one byte range per expert; the multi-token-prediction
        layers the hub's V3 checkpoints append (``model.layers.61.*`` past
        `num_hidden_layers`) are left out, so no rank reads them (transformers skips them
        too)."""
        kept, dropped = {}, 0
        for name, meta in tensors.items():
            match = _LAYER.match(name)
            if match and int(match[1]) >= config.num_hidden_layers:
                dropped += meta.length
            else:
                kept[name] = meta
        if dropped:
            logger.info("the checkpoint's %.1f MB of layers past num_hidden_layers (%d: "
                        "multi-token prediction) are not read", dropped / 1e6, config.num_hidden_layers)
        return super().checkpoint_tensors(config, unpack_experts(kept, block="mlp"))


register_family(ModelFamily(("deepseek_v2",), read_deepseek_v2, DeepseekForCausalLM,
                            unread=("num_key_value_heads", "head_dim"), keep_float32=ROUTER_FLOAT32[:1]))
