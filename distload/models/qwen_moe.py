"""Qwen2-MoE and Qwen3-MoE: the Qwen decoders with sparse mixture-of-experts MLPs.

A layer's MLP is sparse when it is not in `mlp_only_layers` and ``(index + 1) %
decoder_sparse_step == 0``; else it is a dense SwiGLU of `intermediate_size`. The sparse
block routes each token to `num_experts_per_tok` of `num_experts` SwiGLU experts of
`moe_intermediate_size` (softmax over all experts in float32, top-k, renormalized when
`norm_topk_prob`); Qwen2-MoE adds a shared expert on every token, scaled by
``sigmoid(shared_expert_gate(x))``. Qwen3-MoE's attention has Qwen3's per-head q/k norms;
Qwen2-MoE's has q/k/v biases (`qkv_bias`).

Checkpoints: the hub's one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, what
transformers 5's `save_pretrained` writes too) or packed experts
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj``), each expert a
byte range of those (`distload.models.common.moe.unpack_experts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


from ..checkpoint.types import TensorMeta
from .common.config import FULL, SLIDING, DecoderConfig, positive_int, qwen_layer_types, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.moe import SparseMoE, unpack_experts
from .qwen3 import qwen_attention
from .registry import ModelFamily, register_family

__all__ = ["QwenMoeConfig", "QwenMoeForCausalLM", "QwenMoeDecoderLayer", "read_qwen_moe"]

# transformers 5's Qwen2MoeConfig / Qwen3MoeConfig defaults for keys a config.json may omit.
_DEFAULTS = {
    "qwen2_moe": {"intermediate_size": 5632, "max_position_embeddings": 32768, "num_experts": 60,
                  "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"intermediate_size": 6144, "max_position_embeddings": 32768, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768},
}


@dataclass(frozen=True, kw_only=True)
class QwenMoeConfig(DecoderConfig):
    """A Qwen2-MoE or Qwen3-MoE decoder. Example::

        cfg = read_qwen_moe(json.load(open("Qwen3-30B-A3B/config.json")))
        cfg.is_sparse(0), cfg.num_experts        # True, 128
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0   # 0: no shared expert (Qwen3-MoE)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a mixture of experts (else a dense MLP)."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


def _qwen2_moe_windows(d: dict[str, Any], layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    # Qwen2MoeConfig: with use_sliding_window, the even layers below max_window_layers slide.
    if not d.get("use_sliding_window", False) or d.get("sliding_window", 4096) is None:
        return None, None
    layer_types = d.get("layer_types") or [
        SLIDING if (i + 1) % 2 and i < d.get("max_window_layers", 28) else FULL for i in range(layers)]
    return (int(d.get("sliding_window", 4096)), tuple(layer_types)) if SLIDING in layer_types \
        else (None, None)


def read_qwen_moe(d: dict[str, Any]) -> QwenMoeConfig:
    """The `QwenMoeConfig` of a qwen2_moe or qwen3_moe config.json dict; ValueError naming
    an unsupported field."""
    model_type = d["model_type"]
    defaults = _DEFAULTS[model_type]
    fields = read_decoder(d, defaults=defaults)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    if model_type == "qwen2_moe":
        window, layer_types = _qwen2_moe_windows(d, layers)
        bias = dict(qkv_bias=bool(d.get("qkv_bias", True)), o_bias=False)
    else:
        window, layer_types = qwen_layer_types(d, layers, every_layer=True)
        bias = dict(qkv_bias=bool(d.get("attention_bias", False)),
                    o_bias=bool(d.get("attention_bias", False)))
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ValueError(f"mlp_only_layers must be layer indices, not {only!r}")
    # transformers 5 writes `num_local_experts` (its alias of `num_experts`); the hub has the latter.
    experts = d.get("num_experts", d.get("num_local_experts", defaults["num_experts"]))
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        raise ValueError(f"num_experts must be an integer >= 0, not {experts!r}")
    shared = d.get("shared_expert_intermediate_size", defaults.get("shared_expert_intermediate_size", 0))
    return QwenMoeConfig(
        **fields, sliding_window=window, layer_types=layer_types, **bias,
        num_experts=experts,
        num_experts_per_tok=positive_int(d, "num_experts_per_tok", defaults["num_experts_per_tok"]),
        moe_intermediate_size=positive_int(d, "moe_intermediate_size", defaults["moe_intermediate_size"]),
        shared_expert_intermediate_size=int(shared or 0) if model_type == "qwen2_moe" else 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=positive_int(d, "decoder_sparse_step", 1),
        mlp_only_layers=tuple(only))


def qwen_sparse_block(config: QwenMoeConfig) -> SparseMoE:
    """The sparse MLP of one layer (experts named ``gate_proj``/``up_proj``/``down_proj``)."""
    h, act = config.hidden_size, config.hidden_act
    experts = [GatedMLP(h, config.moe_intermediate_size, act=act) for _ in range(config.num_experts)]
    shared = None
    if config.shared_expert_intermediate_size:
        shared = GatedMLP(h, config.shared_expert_intermediate_size, act=act)
    return SparseMoE(hidden=h, experts=experts, top_k=config.num_experts_per_tok,
                     norm_topk_prob=config.norm_topk_prob, shared_expert=shared,
                     shared_expert_gate=shared is not None)


class QwenMoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: QwenMoeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = qwen_attention(config, layer_idx, qkv_bias=config.qkv_bias,
                                        o_bias=config.o_bias, qk_norm=config.model_type == "qwen3_moe")
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = qwen_sparse_block(config) if config.is_sparse(layer_idx) \
            else GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class QwenMoeForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["QwenMoeDecoderLayer"]

    def __init__(self, config: QwenMoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, QwenMoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: QwenMoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Packed experts become one byte range per expert and matrix."""
        return super().checkpoint_tensors(config, unpack_experts(tensors, block="mlp"))


register_family(ModelFamily(("qwen2_moe", "qwen3_moe"), read_qwen_moe, QwenMoeForCausalLM))
