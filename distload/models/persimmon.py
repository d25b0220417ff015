"""Persimmon (Adept, and Fuyu's text model): GPT-NeoX's fused per-head q/k/v projection
(with biases) and serial residual, layer norms on queries and keys per head
(`qk_layernorm`, with biases, on by default), partial RoPE (0.5 by default) and a relu²
MLP with biases.

Checkpoint names (``self_attn.query_key_value``, ``self_attn.dense``, ``q_layernorm``,
``mlp.dense_h_to_4h``, ``model.final_layernorm``) are mapped onto the shared skeleton's by
`checkpoint_tensors` (whole tensors renamed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import PlainMLP, activation
from .gpt_neox import GPTNeoXAttention
from .registry import ModelFamily, register_family

__all__ = ["PersimmonConfig", "PersimmonForCausalLM", "PersimmonDecoderLayer", "read_persimmon"]

# PersimmonConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 16384, "max_position_embeddings": 16384, "layer_norm_eps": 1e-5,
             "hidden_act": "relu2", "bos_token_id": 1, "eos_token_id": 2}
_NAMES = ((r"^model\.final_layernorm\.", "model.norm."),
          (r"\.self_attn\.query_key_value\.", ".self_attn.qkv_proj."),
          (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
          (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
          (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."),
          (r"\.mlp\.dense_h_to_4h\.", ".mlp.c_fc."),
          (r"\.mlp\.dense_4h_to_h\.", ".mlp.c_proj."))


@dataclass(frozen=True, kw_only=True)
class PersimmonConfig(DecoderConfig):
    """A Persimmon decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_persimmon(json.load(open("persimmon-8b-base/config.json")))
    """

    qk_layernorm: bool = True


def read_persimmon(d: dict[str, Any]) -> PersimmonConfig:
    """The `PersimmonConfig` of a config.json dict; ValueError naming an unsupported field."""
    # every head has its own key and value; head_dim is hidden / heads
    d = {k: v for k, v in d.items() if k not in ("head_dim", "num_key_value_heads")}
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps",
                          rope_kw={"partial_rotary_factor": 0.5})
    activation(fields["hidden_act"])
    if fields["head_dim"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError(f"hidden_size ({fields['hidden_size']}) must be a multiple of "
                         f"num_attention_heads ({fields['num_attention_heads']}) for persimmon")
    flag = d.get("qk_layernorm", True)
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"qk_layernorm must be true or false, not {flag!r}")
    return PersimmonConfig(**fields, qk_layernorm=flag is not False)


class PersimmonDecoderLayer(DecoderLayer):
    def __init__(self, config: PersimmonConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        norms = dict(q_norm=nn.LayerNorm(d, eps=eps), k_norm=nn.LayerNorm(d, eps=eps)) \
            if config.qk_layernorm else {}
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = GPTNeoXAttention(
            hidden=h, heads=config.num_attention_heads, kv_heads=config.num_attention_heads, head_dim=d,
            layer_key=str(layer_idx), qkv_bias=True, o_bias=True, fused_qkv=True, rope_key="rotary_emb",
            **norms)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class PersimmonForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["PersimmonDecoderLayer"]

    def __init__(self, config: PersimmonConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, PersimmonDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: PersimmonConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Persimmon's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("persimmon",), read_persimmon, PersimmonForCausalLM,
                            unread=("head_dim", "num_key_value_heads")))
