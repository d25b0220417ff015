"""GLM-4.5 / 4.6 (glm4_moe): a Llama-shaped decoder whose MLPs, after the first
`first_k_dense_replace` dense layers, are DeepSeek-V3-style mixtures of experts.

* attention: q/k/v biases (`attention_bias`), no o bias, optional per-head RMSNorm on
  queries and keys (`use_qk_norm`), RoPE on the first half of each head
  (`partial_rotary_factor` 0.5 by default; halves, not GLM-4's interleaved pairs);
* MoE: DeepSeek-V3's ``noaux_tc`` routing (`common.routing.GroupedTopKRouter`: sigmoid
  scores, ``e_score_correction_bias`` for the choice, `n_group` / `topk_group`,
  renormalized, times `routed_scaling_factor`; router kept in float32) over
  `n_routed_experts` SwiGLU experts, plus always-on ``shared_experts`` of
  ``n_shared_experts * moe_intermediate_size``;
* the checkpoint's trailing multi-token-prediction layer (``model.layers.<N>.``) is not
  read (`drop_extra_layers`).

Checkpoints: one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; the hub's and
`save_pretrained`'s layout) or packed (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``), each
expert a byte range of those (`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.config import DecoderConfig, int_at_least, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer, drop_extra_layers
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import unpack_experts
from .common.routing import ROUTER_FLOAT32, check_grouped_routing, noaux_tc_experts
from .qwen3 import qwen_attention
from .registry import ModelFamily, register_family

__all__ = ["Glm4MoeConfig", "Glm4MoeForCausalLM", "Glm4MoeDecoderLayer", "read_glm4_moe"]

# Glm4MoeConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 10944, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "num_key_value_heads": 8}


@dataclass(frozen=True, kw_only=True)
class Glm4MoeConfig(DecoderConfig):
    """A GLM-4.5 decoder. Example::

        cfg = read_glm4_moe(json.load(open("GLM-4.5-Air/config.json")))
        cfg.is_sparse(0), cfg.is_sparse(1), cfg.n_routed_experts      # False, True, 128
    """

    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1408
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    attention_bias: bool = False
    use_qk_norm: bool = False

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


def read_glm4_moe(d: dict[str, Any]) -> Glm4MoeConfig:
    """The `Glm4MoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, rope_kw=dict(partial_rotary_factor=0.5))
    activation(fields["hidden_act"])
    scale = d.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"routed_scaling_factor must be a positive number, not {scale!r}")
    experts = positive_int(d, "n_routed_experts", 128)
    top_k = positive_int(d, "num_experts_per_tok", 8)
    n_group, topk_group = positive_int(d, "n_group", 1), positive_int(d, "topk_group", 1)
    check_grouped_routing(method="noaux_tc", experts=experts, top_k=top_k, groups=n_group,
                          topk_group=topk_group)
    return Glm4MoeConfig(
        **fields, n_routed_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=positive_int(d, "moe_intermediate_size", 1408),
        n_shared_experts=int_at_least(d, "n_shared_experts", 1, 0),
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=float(scale),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        first_k_dense_replace=int_at_least(d, "first_k_dense_replace", 1, 0),
        attention_bias=bool(d.get("attention_bias", False)), use_qk_norm=bool(d.get("use_qk_norm", False)))


class Glm4MoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Glm4MoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = qwen_attention(config, layer_idx, qkv_bias=config.attention_bias, o_bias=False,
                                        qk_norm=config.use_qk_norm)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = noaux_tc_experts(config, experts=config.n_routed_experts, shared_experts=config.n_shared_experts) \
            if config.is_sparse(layer_idx) else GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class Glm4MoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Glm4MoeDecoderLayer"]

    def __init__(self, config: Glm4MoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Glm4MoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: Glm4MoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Without the multi-token-prediction layer; packed experts as byte ranges."""
        own = drop_extra_layers(tensors, config.num_hidden_layers)
        return super().checkpoint_tensors(config, unpack_experts(own, block="mlp"))


register_family(ModelFamily(("glm4_moe",), read_glm4_moe, Glm4MoeForCausalLM, keep_float32=ROUTER_FLOAT32))
