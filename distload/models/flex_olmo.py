"""FlexOlmo: OLMo 2's layer (`olmo2.py`: norms after attention and after the MLP, inside
the residual; RMSNorm on the whole query and key projections) with OLMoE's mixture of
experts in every layer (softmax top-k, renormalized with `norm_topk_prob`).

Checkpoints: one tensor per expert (what `save_pretrained` writes) or packed (`unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.config import positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import SparseMoE, unpack_experts
from .olmo2 import Olmo2Config, Olmo2DecoderLayer
from .registry import ModelFamily, register_family

__all__ = ["FlexOlmoConfig", "FlexOlmoForCausalLM", "FlexOlmoDecoderLayer", "read_flex_olmo"]

# FlexOlmoConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
             "rope_theta": 500000.0, "pad_token_id": 100277, "eos_token_id": 100257}


@dataclass(frozen=True, kw_only=True)
class FlexOlmoConfig(Olmo2Config):
    """A FlexOlmo decoder. Example::

        cfg = read_flex_olmo(json.load(open("FlexOlmo-7x7B-1T/config.json")))
        cfg.num_experts, cfg.num_experts_per_tok     # 7, 5
    """

    num_experts: int = 7
    num_experts_per_tok: int = 5
    norm_topk_prob: bool = False


def read_flex_olmo(d: dict[str, Any]) -> FlexOlmoConfig:
    """The `FlexOlmoConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    experts = positive_int(d, "num_experts", d.get("num_local_experts", 7))
    top_k = positive_int(d, "num_experts_per_tok", 5)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
    return FlexOlmoConfig(**fields, attention_bias=bool(d.get("attention_bias", False)), num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=bool(d.get("norm_topk_prob", False)))


class FlexOlmoDecoderLayer(Olmo2DecoderLayer):
    def __init__(self, config: FlexOlmoConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.mlp = SparseMoE(hidden=h, top_k=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
                             experts=[GatedMLP(h, config.intermediate_size, act=config.hidden_act)
                                      for _ in range(config.num_experts)])


class FlexOlmoForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["FlexOlmoDecoderLayer"]

    def __init__(self, config: FlexOlmoConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="olmo")
        super().__init__(config, DecoderModel(config, FlexOlmoDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: FlexOlmoConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        return unpack_experts(tensors, block="mlp")


register_family(ModelFamily(("flex_olmo",), read_flex_olmo, FlexOlmoForCausalLM))
