"""Cohere (Command-R): one layer norm (no bias, float32) feeds attention and the MLP in
parallel, ``x + attn(norm(x)) + mlp(norm(x))``; RoPE on interleaved channel pairs,
rotated in float32; optional per-head layer norms on queries and keys (`use_qk_norm`);
logits multiplied by `logit_scale` (in `final_logits`, so generation gets it too); tied
embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, LayerNormNoBias, activation
from .registry import ModelFamily, register_family

__all__ = ["CohereConfig", "CohereForCausalLM", "CohereDecoderLayer", "read_cohere"]

# CohereConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 22528, "max_position_embeddings": 8192, "layer_norm_eps": 1e-5,
             "rope_theta": 5e5, "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 5,
             "eos_token_id": 255001}


@dataclass(frozen=True, kw_only=True)
class CohereConfig(DecoderConfig):
    """A Cohere decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_cohere(json.load(open("c4ai-command-r-v01/config.json")))
        cfg.logit_scale         # 0.0625
    """

    logit_scale: float = 0.0625
    attention_bias: bool = False
    use_qk_norm: bool = False


def read_cohere(d: dict[str, Any]) -> CohereConfig:
    """The `CohereConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps")
    activation(fields["hidden_act"])
    scale = d.get("logit_scale", 0.0625)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"logit_scale must be a number, not {scale!r}")
    return CohereConfig(**fields, logit_scale=float(scale),
                        attention_bias=bool(d.get("attention_bias", False)),
                        use_qk_norm=bool(d.get("use_qk_norm", False)))


class CohereDecoderLayer(DecoderLayer):
    def __init__(self, config: CohereConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d, bias = config.hidden_size, config.rms_norm_eps, config.head_dim, config.attention_bias
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        norms = dict(q_norm=LayerNormNoBias((heads, d), eps), k_norm=LayerNormNoBias((kv_heads, d), eps)) \
            if config.use_qk_norm else {}
        self.input_layernorm = LayerNormNoBias(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias, **norms,
                                             interleaved_rope=True, rope_upcast=True)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        return x + self.self_attn(normed, rope, mask, cache) + self.mlp(normed)


class CohereForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["CohereDecoderLayer"]

    def __init__(self, config: CohereConfig) -> None:
        norm = LayerNormNoBias(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, CohereDecoderLayer, norm=norm, interleaved_rope=True))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.config.logit_scale


register_family(ModelFamily(("cohere",), read_cohere, CohereForCausalLM))
