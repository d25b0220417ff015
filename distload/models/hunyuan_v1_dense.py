"""HunYuan dense (V1): Llama's decoder with per-head RMSNorm on queries and keys *after*
RoPE (``self_attn.query_layernorm`` / ``key_layernorm`` in checkpoints). Its long-context
RoPE (``{"type": "dynamic", "alpha": A}``) is NTK-alpha: a fixed base of
``theta * A ** (d / (d - 2))``, not transformers' stateful dynamic NTK."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer, rename_tensors
from .common.layers import GatedMLP, RMSNorm, activation
from .common.rope import RopeParams, read_rope
from .registry import ModelFamily, register_family

__all__ = ["HunYuanDenseConfig", "HunYuanDenseForCausalLM", "HunYuanDenseDecoderLayer", "read_hunyuan_rope",
           "read_hunyuan_dense"]

# HunYuanDenseV1Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# The checkpoint's q/k norm names onto `Attention`'s.
_NAMES = ((r"\.self_attn\.query_layernorm\.", ".self_attn.q_norm."),
          (r"\.self_attn\.key_layernorm\.", ".self_attn.k_norm."))


@dataclass(frozen=True, kw_only=True)
class HunYuanDenseConfig(DecoderConfig):
    """A HunYuan dense decoder. Example::

        cfg = read_hunyuan_dense(json.load(open("Hunyuan-7B-Instruct/config.json")))
    """

    attention_bias: bool = False


def read_hunyuan_rope(d: dict[str, Any], head_dim: int, max_positions: int) -> RopeParams:
    """The RoPE of a HunYuan config: NTK-alpha (``dynamic`` with an `alpha`) as a plain
    RoPE of the larger base, as transformers' ``ntk_alpha`` computes it; else `read_rope`."""
    params = d.get("rope_parameters") or d.get("rope_scaling")
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if isinstance(params, dict) and (params.get("rope_type") or params.get("type")) == "dynamic" \
            and params.get("alpha") is not None:
        alpha = params["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{field}.alpha must be a positive number, not {alpha!r}")
        if head_dim < 3:
            raise ValueError(f"head_dim ({head_dim}) must be at least 3 for NTK-alpha RoPE")
        base = read_rope({**d, "rope_parameters": {"rope_theta": params.get("rope_theta")}, "rope_scaling": None},
                         default_theta=10000.0, max_positions=max_positions).theta
        return RopeParams(theta=base * alpha ** (head_dim / (head_dim - 2)))
    return read_rope(d, default_theta=10000.0, max_positions=max_positions)


def read_hunyuan_dense(d: dict[str, Any]) -> HunYuanDenseConfig:
    """The `HunYuanDenseConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, rope=RopeParams())
    activation(fields["hidden_act"])
    rope = read_hunyuan_rope(d, fields["head_dim"], fields["max_position_embeddings"])
    return HunYuanDenseConfig(**fields | {"rope": rope}, attention_bias=bool(d.get("attention_bias", False)))


def hunyuan_attention(config: Any, layer_idx: int) -> Attention:
    """HunYuan's attention (dense and MoE): q/k norms per head after RoPE."""
    d, eps, bias = config.head_dim, config.rms_norm_eps, config.attention_bias
    return Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias, q_norm=RMSNorm(d, eps),
                               k_norm=RMSNorm(d, eps), norm_after_rope=True)


def hunyuan_tensors(tensors: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
    """HunYuan's q/k norm names onto `Attention`'s (``query_layernorm`` → ``q_norm``)."""
    return rename_tensors(tensors, _NAMES)


class HunYuanDenseDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: HunYuanDenseConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = hunyuan_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class HunYuanDenseForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["HunYuanDenseDecoderLayer"]

    def __init__(self, config: HunYuanDenseConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, HunYuanDenseDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: HunYuanDenseConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        return hunyuan_tensors(tensors)


register_family(ModelFamily(("hunyuan_v1_dense",), read_hunyuan_dense, HunYuanDenseForCausalLM))
