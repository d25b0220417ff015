"""The Gemma family: Gemma (1), Gemma 2, Gemma 3's text model, and the text part of Gemma 3
multimodal checkpoints (≥ 4B), on the shared skeleton.

What all three share: RMSNorm with a zero-centred weight, ``normed * (1 + w)``; embeddings
scaled by √hidden (rounded to the activations' dtype); GeGLU MLPs (gelu-tanh); tied
embeddings by default; a head_dim of its own (256 by default).

Gemma 2 and 3 add "sandwich" norms (after attention and around the MLP), a query scale of
``query_pre_attn_scalar ** -0.5``, sliding-window layers (`layer_types`: Gemma 2
alternates sliding and global, Gemma 3 has 5 local to 1 global), and final-logit
soft-capping (``cap * tanh(logits / cap)``, in `final_logits`, so generation gets it
too). Gemma 2 also soft-caps the attention scores; Gemma 3 instead normalizes queries and
keys per head, and its local layers use their own RoPE base (`local_rope`).

    Gemma 2/3 layer: x + post_attention_layernorm(attn(input_layernorm(x)))
                     then + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .common.attention import Attention
from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder, text_config
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .common.rope import RopeParams, RotaryEmbedding, read_rope
from .registry import ModelFamily, register_family

__all__ = ["GemmaConfig", "GemmaForCausalLM", "GemmaDecoderLayer", "Gemma2DecoderLayer", "read_gemma"]

# transformers 5's GemmaConfig / Gemma2Config / Gemma3TextConfig defaults.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"head_dim": 256, "max_position_embeddings": 8192, "num_key_value_heads": 16,
              "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True, "eos_token_id": 1,
              "bos_token_id": 2, "pad_token_id": 0, "intermediate_size": 24576},
    "gemma2": {"head_dim": 256, "max_position_embeddings": 8192, "num_key_value_heads": 4,
               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
               "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0, "intermediate_size": 9216,
               "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 256, "max_position_embeddings": 131072, "num_key_value_heads": 4,
                    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                    "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0,
                    "intermediate_size": 9216, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "final_logit_softcapping": None, "attn_logit_softcapping": None},
}


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(DecoderConfig):
    """A Gemma, Gemma 2 or Gemma 3 (text) decoder. `query_pre_attn_scalar` None: the query
    scale is ``head_dim ** -0.5`` (Gemma 1). `local_rope` is Gemma 3's RoPE of its
    sliding layers. Example::

        cfg = read_gemma(json.load(open("gemma-2-27b/config.json")))
        cfg.final_logit_softcapping, cfg.layer_sliding_window(0)     # 30.0, 4096
    """

    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope: RopeParams | None = None

    @property
    def generation(self) -> int:
        return {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[self.model_type]


def _gemma3_ropes(d: dict[str, Any], max_pos: int) -> tuple[RopeParams, RopeParams]:
    """(global, local) RoPE of a Gemma 3 text config: transformers 5 nests them by layer
    type in `rope_parameters`; 4 had `rope_theta` + `rope_scaling` (global) and
    `rope_local_base_freq` (local)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full = read_rope(d, params=params.get(FULL) or {}, default_theta=1e6, max_positions=max_pos,
                         field=f"rope_parameters.{FULL}")
        local = read_rope({}, params=params.get(SLIDING) or {}, default_theta=1e4,
                          max_positions=max_pos, field=f"rope_parameters.{SLIDING}")
        return full, local
    full = read_rope(d, default_theta=1e6, max_positions=max_pos)
    return full, RopeParams(theta=float(d.get("rope_local_base_freq", 1e4)))


def _layer_types(d: dict[str, Any], model_type: str, layers: int) -> tuple[str, ...] | None:
    if model_type == "gemma":
        return None
    if d.get("layer_types"):
        if not isinstance(d["layer_types"], list):
            raise ValueError(f"layer_types must be a list, not {d['layer_types']!r}")
        return tuple(d["layer_types"])
    # Gemma 2: even layers slide; Gemma 3: every `sliding_window_pattern`-th layer is global.
    key = "sliding_window_pattern" if d.get("sliding_window_pattern") is not None else "_sliding_window_pattern"
    pattern = 2 if model_type == "gemma2" else positive_int(d, key, 6)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))


def read_gemma(d: dict[str, Any], *, nested_in: str | None = None) -> GemmaConfig:
    """The `GemmaConfig` of a gemma, gemma2 or gemma3_text config.json dict; ValueError
    naming an unsupported field."""
    model_type = d["model_type"]
    defaults = _DEFAULTS[model_type]
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention is set: this {model_type} model "
                         "is an encoder (embeddings), not a causal LM distload can run")
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    max_pos = int(d.get("max_position_embeddings") or defaults["max_position_embeddings"])
    rope, local = (_gemma3_ropes(d, max_pos) if model_type == "gemma3_text" else (None, None))
    fields = read_decoder(d, defaults=defaults, act_key=act_key, rope=rope)
    if fields["hidden_act"] == "gelu":  # Gemma's legacy name for the tanh approximation
        fields["hidden_act"] = "gelu_pytorch_tanh"
    activation(fields["hidden_act"], act_key)
    layer_types = _layer_types(d, model_type, fields["num_hidden_layers"])
    window = d.get("sliding_window", defaults.get("sliding_window")) if layer_types else None

    def opt_float(key: str) -> float | None:
        value = d.get(key, defaults.get(key))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{key} must be a positive number or null, not {value!r}")
        return None if value is None else float(value)

    return GemmaConfig(
        **fields | {"nested_in": nested_in}, layer_types=layer_types,
        sliding_window=None if window is None else int(window),
        attention_bias=bool(d.get("attention_bias", False)),
        query_pre_attn_scalar=opt_float("query_pre_attn_scalar"),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping.
        attn_logit_softcapping=opt_float("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_logit_softcapping=opt_float("final_logit_softcapping"), local_rope=local)


def read_gemma3(d: dict[str, Any]) -> GemmaConfig:
    """The text model of a Gemma 3 multimodal config.json (``model_type: gemma3``)."""
    text = text_config(d, "gemma3", "gemma3_text")
    return read_gemma(text, nested_in="gemma3")


def _attention(config: GemmaConfig, layer_idx: int) -> Attention:
    d, eps = config.head_dim, config.rms_norm_eps
    window = config.layer_sliding_window(layer_idx)
    scalar = config.query_pre_attn_scalar
    norms = dict(q_norm=RMSNorm(d, eps, style="gemma"), k_norm=RMSNorm(d, eps, style="gemma")) \
        if config.generation == 3 else {}
    return Attention.for_layer(
        config, layer_idx, qkv_bias=config.attention_bias, o_bias=config.attention_bias, **norms,
        scale=None if scalar is None else scalar ** -0.5, softcap=config.attn_logit_softcapping,
        rope_key="rotary_local" if config.local_rope is not None and window is not None else "rotary_emb")


class GemmaDecoderLayer(PreNormDecoderLayer):
    """Gemma 1: pre-norm attention and MLP, as Llama."""

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, style="gemma")
        self.self_attn = _attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, style="gemma")
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """Gemma 2 and 3: sandwich norms around attention and MLP (`post_attention_layernorm`
    is applied to the attention's output here, not before the MLP)."""

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_feedforward_layernorm = RMSNorm(h, eps, style="gemma")
        self.post_feedforward_layernorm = RMSNorm(h, eps, style="gemma")

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(DecoderModel):
    def __init__(self, config: GemmaConfig) -> None:
        layer = GemmaDecoderLayer if config.generation == 1 else Gemma2DecoderLayer
        extra = {}
        if config.local_rope is not None:
            extra["rotary_local"] = RotaryEmbedding(config.local_rope, head_dim=config.head_dim,
                                                    max_positions=config.max_position_embeddings)
        super().__init__(config, layer, norm=RMSNorm(config.hidden_size, config.rms_norm_eps, style="gemma"),
                         extra_rotary=extra)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        # √hidden as a float32 scalar rounded to the weights' dtype, as transformers does.
        return h * torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype)


class GemmaForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GemmaDecoderLayer", "Gemma2DecoderLayer"]

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__(config, GemmaModel(config))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


register_family(ModelFamily(("gemma", "gemma2", "gemma3_text"), read_gemma, GemmaForCausalLM))
register_family(ModelFamily(("gemma3",), read_gemma3, GemmaForCausalLM, nested_text=True))
