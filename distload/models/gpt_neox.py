"""GPT-NeoX (Pythia, GPT-NeoX-20B): layer norms with biases, one fused q/k/v projection
laid out per head (head h's query, key and value rows together), partial RoPE
(`partial_rotary_factor`, 0.25 by default), a plain GELU MLP with biases and, with
`use_parallel_residual` (the default), attention and MLP side by side:

    parallel: x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))
    serial:   y = x + attn(input_layernorm(x)); y + mlp(post_attention_layernorm(y))

Checkpoint names are GPT-NeoX's own (``gpt_neox.embed_in``, ``gpt_neox.layers.{i}.attention.
query_key_value``, ``embed_out`` ...), mapped onto the shared skeleton's by `checkpoint_tensors`
(whole tensors renamed: the bytes each rank reads do not change).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import PlainMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["GPTNeoXConfig", "GPTNeoXForCausalLM", "GPTNeoXDecoderLayer", "read_gpt_neox"]

# GPTNeoXConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 24576, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
             "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 2}

_NAMES = ((r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
          (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
          (r"^embed_out\.", "lm_head."),
          (r"^gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.", r"model.layers.\1.self_attn.qkv_proj."),
          (r"^gpt_neox\.layers\.(\d+)\.attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
          (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.c_fc."),
          (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.c_proj."),
          (r"^gpt_neox\.layers\.", "model.layers."))


@dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(DecoderConfig):
    """A GPT-NeoX decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_gpt_neox(json.load(open("pythia-1b/config.json")))
        cfg.rope.partial_rotary_factor, cfg.use_parallel_residual      # 0.25, True
    """

    use_parallel_residual: bool = True
    attention_bias: bool = True


def read_gpt_neox(d: dict[str, Any]) -> GPTNeoXConfig:
    """The `GPTNeoXConfig` of a config.json dict; ValueError naming an unsupported field."""
    # transformers 4's names for the RoPE: rotary_pct, rotary_emb_base
    rope_kw = {"partial_rotary_factor": d.get("rotary_pct", 0.25)}
    if "rotary_emb_base" in d and "rope_theta" not in d:
        d = {**d, "rope_theta": d["rotary_emb_base"]}
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps", rope_kw=rope_kw)
    activation(fields["hidden_act"])
    if fields["num_key_value_heads"] != fields["num_attention_heads"] or \
            fields["head_dim"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError("num_key_value_heads and head_dim are fixed for gpt_neox (all heads, "
                         "hidden_size / num_attention_heads)")
    return GPTNeoXConfig(**fields, use_parallel_residual=bool(d.get("use_parallel_residual", True)),
                         attention_bias=bool(d.get("attention_bias", True)))


class GPTNeoXAttention(Attention):
    """Fused q/k/v whose rows are grouped per head: ``[q_h, k_h, v_h]`` for each head h."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.num_heads, 3 * self.head_dim)
        return tuple(y.reshape(b, t, -1) for y in qkv.chunk(3, dim=-1))


class GPTNeoXDecoderLayer(DecoderLayer):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = GPTNeoXAttention(
            hidden=h, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim, layer_key=str(layer_idx), qkv_bias=bias, o_bias=bias,
            fused_qkv=True, rope_key="rotary_emb")
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        if self.parallel:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        y = x + attn
        return y + self.mlp(self.post_attention_layernorm(y))


class GPTNeoXForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GPTNeoXDecoderLayer"]

    def __init__(self, config: GPTNeoXConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, GPTNeoXDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: GPTNeoXConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """GPT-NeoX's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("gpt_neox",), read_gpt_neox, GPTNeoXForCausalLM))
