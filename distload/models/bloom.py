"""BLOOM (BigScience's bloom-560m ... bloom-176b, bloomz): ALiBi instead of position
embeddings, a layer norm on the embeddings, per-head fused q/k/v (``[q_h, k_h, v_h]``,
GPT-NeoX's layout), biased layer norms and Linears, a tanh-GELU MLP of 4 x hidden, and a
head tied to the token embeddings.

ALiBi adds ``slope_h * position_of_key`` to head h's scores, the slopes a geometric
series over the heads (`alibi_slopes`); positions count each row's real tokens, as
transformers counts them, so left padding does not shift them. The bias joins the causal
and padding mask each layer's attention gets (`DecoderModel.attention_bias`); nothing is
learned, so there is no table and no length limit.

Checkpoint names are BLOOM's own, with (``transformer.h.{i}.self_attention...``, what
transformers writes) or without (``h.{i}...``, the hub's files) the ``transformer.``
prefix, mapped onto the shared skeleton's (whole tensors renamed). The embedding's layer
norm stays on the embedding's stage (`joined_units`). `apply_residual_connection_post_layernorm`
is read; `pretraining_tp` with `slow_but_exact` (a summation order) is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import attention_mask_bias
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import PlainMLP
from .common.rope import RopeParams
from .gpt_neox import GPTNeoXAttention
from .registry import ModelFamily, register_family

__all__ = ["BloomConfig", "BloomForCausalLM", "BloomDecoderLayer", "read_bloom", "alibi_slopes"]

# BloomConfig's defaults (transformers 5), under its own key names.
_DEFAULTS = {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "layer_norm_epsilon": 1e-5,
             "bos_token_id": 1, "eos_token_id": 2}

_PREFIX = r"^(?:transformer\.)?"
_NAMES = ((_PREFIX + r"word_embeddings\.", "model.embed_tokens."),
          (_PREFIX + r"word_embeddings_layernorm\.", "model.embed_norm."),
          (_PREFIX + r"ln_f\.", "model.norm."),
          (_PREFIX + r"h\.(\d+)\.self_attention\.query_key_value\.", r"model.layers.\1.self_attn.qkv_proj."),
          (_PREFIX + r"h\.(\d+)\.self_attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
          (_PREFIX + r"h\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.c_fc."),
          (_PREFIX + r"h\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.c_proj."),
          (_PREFIX + r"h\.(\d+)\.", r"model.layers.\1."))


@dataclass(frozen=True, kw_only=True)
class BloomConfig(DecoderConfig):
    """A BLOOM decoder (`rms_norm_eps` holds `layer_norm_epsilon`). Example::

        cfg = read_bloom(json.load(open("bloom-560m/config.json")))
        cfg.num_attention_heads, cfg.intermediate_size      # 16, 4096
    """

    apply_residual_connection_post_layernorm: bool = False


def read_bloom(d: dict[str, Any]) -> BloomConfig:
    """The `BloomConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k not in _DEFAULTS}}
    if d.get("n_embed") is not None and d.get("hidden_size") == _DEFAULTS["hidden_size"]:
        d["hidden_size"] = d["n_embed"]   # transformers' old name, still accepted
    post = d.get("apply_residual_connection_post_layernorm", False)
    if not isinstance(post, bool):
        raise ValueError(f"apply_residual_connection_post_layernorm must be true or false, got {post!r}")
    layers, heads = positive_int(d, "n_layer"), positive_int(d, "n_head")
    d.pop("head_dim", None)
    d.pop("num_key_value_heads", None)
    hidden = positive_int(d, "hidden_size")
    fields = read_decoder({**d, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": 4 * hidden, "hidden_act": "gelu_pytorch_tanh"},
                          defaults={"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5},
                          eps_key="layer_norm_epsilon", rope=RopeParams())
    if fields["head_dim"] * heads != hidden:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of n_head ({heads})")
    fields["num_key_value_heads"] = heads
    return BloomConfig(**fields, apply_residual_connection_post_layernorm=post)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes ``[heads]`` (float32), as BLOOM and transformers make them:
    ``2 ** (-8 h / n)`` for the largest power of two n <= heads, then every other slope
    of the series for 2n for the heads beyond."""
    n = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + n, dtype=torch.int32))
    if n != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * n) - 3))), dtype=torch.float32)
        rest = min(n, heads - n)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    return slopes


class BloomDecoderLayer(DecoderLayer):
    """``r + attn(ln(x))`` then ``r' + mlp(ln(y))``, the residuals `x` and `y` (or, with
    `apply_residual_connection_post_layernorm`, the normed inputs)."""

    def __init__(self, config: BloomConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = GPTNeoXAttention(hidden=h, heads=config.num_attention_heads,
                                          kv_heads=config.num_attention_heads, head_dim=config.head_dim,
                                          layer_key=str(layer_idx), fused_qkv=True, qkv_bias=True,
                                          o_bias=True, rope_key=None)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        y = (normed if self.post_norm_residual else x) + self.self_attn(normed, rope, mask, cache)
        normed = self.post_attention_layernorm(y)
        return (normed if self.post_norm_residual else y) + self.mlp(normed)


class BloomModel(DecoderModel):
    """The shared skeleton with the embeddings' layer norm and ALiBi in every layer's bias."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__(config, BloomDecoderLayer, norm=nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps),
                         after_embed={"embed_norm": nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)})
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed_tokens(ids))

    def attention_bias(self, bias: torch.Tensor | None, attention_mask: torch.Tensor | None, *,
                       q_len: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The causal and padding `bias` plus ALiBi: ``slope_h * position`` of every key,
        positions counting each row's real tokens (transformers' `build_alibi_tensor`)."""
        kv_len = past + q_len
        if attention_mask is None:
            positions = torch.arange(kv_len, device=device)[None]
        else:
            mask = attention_mask.to(device).long()
            positions = (mask.cumsum(-1) - 1) * mask
        slopes = alibi_slopes(self.config.num_attention_heads).to(device)
        alibi = (slopes[None, :, None, None] * positions[:, None, None, :]).to(dtype)
        if bias is None:   # plain causal attention: SDPA would have made it, now it is explicit
            bias = attention_mask_bias(None, q_len=q_len, past=past, dtype=dtype, device=device, always=True)
        return bias + alibi


class BloomForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["BloomDecoderLayer"]

    def __init__(self, config: BloomConfig) -> None:
        super().__init__(config, BloomModel(config))

    def joined_units(self) -> tuple[str, ...]:
        return ("model.embed_norm",)

    @classmethod
    def checkpoint_tensors(cls, config: BloomConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """BLOOM's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("bloom",), read_bloom, BloomForCausalLM))
