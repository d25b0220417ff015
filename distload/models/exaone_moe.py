"""K-EXAONE (``exaone_moe``): EXAONE 4.0's attention (per-head q/k RMSNorms; three sliding
layers with RoPE to one global layer without) in a pre-norm layer (OLMoE's), with
DeepSeek-V3's mixture of experts on the layers `mlp_layer_types` marks ``"sparse"`` (all
but the first `first_k_dense_replace` by default): sigmoid ``noaux_tc`` routing with the
learnt bias, renormalized and scaled weights, `num_shared_experts` shared experts fused
into one MLP (`common.routing`).

Checkpoints: one tensor per expert (what `save_pretrained` writes) or packed
(`unpack_experts`); the multi-token-prediction weights (``mtp.``) are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.attention import Attention
from .common.config import int_at_least, positive_int, positive_number
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer, rename_tensors
from .common.layers import GatedMLP, RMSNorm
from .common.moe import unpack_experts
from .common.routing import ROUTER_FLOAT32, check_grouped_routing, noaux_tc_experts
from .exaone4 import Exaone4Config, read_exaone4
from .registry import ModelFamily, register_family

__all__ = ["ExaoneMoeConfig", "ExaoneMoeForCausalLM", "ExaoneMoeDecoderLayer", "read_exaone_moe"]

# ExaoneMoeConfig's defaults (transformers 5) that differ from EXAONE 4.0's.
_DEFAULTS = {"bos_token_id": 1, "eos_token_id": 53, "pad_token_id": 0}
# the bias as the checkpoints keep it (beside the router, not in it)
_NAMES = ((r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),)


@dataclass(frozen=True, kw_only=True)
class ExaoneMoeConfig(Exaone4Config):
    """A K-EXAONE decoder: `sparse_layers` marks the layers with experts. Example::

        cfg = read_exaone_moe(json.load(open("K-EXAONE-236B-A23B/config.json")))
        cfg.num_experts, cfg.is_sparse(0)      # 128, False
    """

    sparse_layers: tuple[bool, ...] = ()
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1024
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1

    def is_sparse(self, layer_idx: int) -> bool:
        return self.sparse_layers[layer_idx]


def read_exaone_moe(d: dict[str, Any]) -> ExaoneMoeConfig:
    """The `ExaoneMoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    base = read_exaone4({**_DEFAULTS, **d})
    layers = base.num_hidden_layers
    dense = int_at_least(d, "first_k_dense_replace", 1, 0)
    types = d.get("mlp_layer_types")
    if types is None:
        types = ["dense" if i < dense else "sparse" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in ("dense", "sparse") for t in types):
        raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers "
                         f"(num_hidden_layers), not {types!r}")
    scaling = positive_number(d, "routed_scaling_factor", 2.5)
    moe = dict(num_experts=int_at_least(d, "num_experts", 64, 1),
               num_experts_per_tok=int_at_least(d, "num_experts_per_tok", 8, 1),
               n_group=int_at_least(d, "n_group", 1, 1), topk_group=int_at_least(d, "topk_group", 1, 1))
    if "sparse" in types:
        check_grouped_routing(method="noaux_tc", experts=moe["num_experts"], top_k=moe["num_experts_per_tok"],
                              groups=moe["n_group"], topk_group=moe["topk_group"])
    return ExaoneMoeConfig(**{f.name: getattr(base, f.name) for f in fields(base)} | {"model_type": "exaone_moe"},
                           **moe, sparse_layers=tuple(t == "sparse" for t in types),
                           moe_intermediate_size=positive_int(d, "moe_intermediate_size", 1024),
                           num_shared_experts=int_at_least(d, "num_shared_experts", 1, 0),
                           norm_topk_prob=bool(d.get("norm_topk_prob", True)), routed_scaling_factor=float(scaling))


class ExaoneMoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ExaoneMoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d, act = config.hidden_size, config.rms_norm_eps, config.head_dim, config.hidden_act
        rope = config.sliding_window is None or config.layer_sliding_window(layer_idx) is not None
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, q_norm=RMSNorm(d, eps), k_norm=RMSNorm(d, eps),
                                             rope_key="rotary_emb" if rope else None)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = noaux_tc_experts(config, experts=config.num_experts, shared_experts=config.num_shared_experts) \
            if config.is_sparse(layer_idx) else GatedMLP(h, config.intermediate_size, act=act)


class ExaoneMoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["ExaoneMoeDecoderLayer"]

    def __init__(self, config: ExaoneMoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, ExaoneMoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: ExaoneMoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Without the multi-token-prediction weights (``mtp.``); packed experts as byte ranges;
        the router's bias (``mlp.e_score_correction_bias``) under the router."""
        own = {k: m for k, m in tensors.items() if not k.startswith("mtp.")}
        return unpack_experts(rename_tensors(own, _NAMES), block="mlp")


register_family(ModelFamily(("exaone_moe",), read_exaone_moe, ExaoneMoeForCausalLM, keep_float32=ROUTER_FLOAT32))
