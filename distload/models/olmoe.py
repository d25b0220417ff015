"""OLMoE: a Llama-shaped decoder with a softmax top-k mixture of experts in every layer,
RMSNorm on the whole query and key projections (before the split into heads, as OLMo 2)
and an optional clamp of queries, keys and values (`clip_qkv`).

Checkpoints: one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; the hub's and
`save_pretrained`'s layout) or packed (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``), each
expert a byte range of those (`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import SparseMoE, unpack_experts
from .registry import ModelFamily, register_family

__all__ = ["OlmoeConfig", "OlmoeForCausalLM", "OlmoeDecoderLayer", "read_olmoe"]

# OlmoeConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 2048, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "pad_token_id": 1, "eos_token_id": 50279}


@dataclass(frozen=True, kw_only=True)
class OlmoeConfig(DecoderConfig):
    """An OLMoE decoder. Example::

        cfg = read_olmoe(json.load(open("OLMoE-1B-7B-0924/config.json")))
        cfg.num_experts, cfg.num_experts_per_tok       # 64, 8
    """

    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False


def read_olmoe(d: dict[str, Any]) -> OlmoeConfig:
    """The `OlmoeConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    if fields["head_dim"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError("head_dim must be hidden_size / num_attention_heads for olmoe "
                         "(its query norm spans hidden_size)")
    clip = d.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip_qkv must be a positive number or null, not {clip!r}")
    experts = positive_int(d, "num_experts", 64)
    top_k = positive_int(d, "num_experts_per_tok", 8)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
    return OlmoeConfig(**fields, num_experts=experts, num_experts_per_tok=top_k,
                       norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       clip_qkv=None if clip is None else float(clip),
                       attention_bias=bool(d.get("attention_bias", False)))


class OlmoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: OlmoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        kv = config.num_key_value_heads * config.head_dim
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias,
                                             q_norm=RMSNorm(h, eps), k_norm=RMSNorm(kv, eps),
                                             norm_full_width=True, clip_qkv=config.clip_qkv)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = SparseMoE(
            hidden=h, top_k=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
            experts=[GatedMLP(h, config.intermediate_size, act=config.hidden_act)
                     for _ in range(config.num_experts)])


class OlmoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["OlmoeDecoderLayer"]

    def __init__(self, config: OlmoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, OlmoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: OlmoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Packed experts become one byte range per expert and matrix."""
        return super().checkpoint_tensors(config, unpack_experts(tensors, block="mlp"))


register_family(ModelFamily(("olmoe",), read_olmoe, OlmoeForCausalLM))
