"""Phi (1, 1.5, 2): one layer norm (with bias) feeding attention and MLP in parallel,
``x + attn(norm(x)) + mlp(norm(x))``; q/k/v and output projections with biases, partial
RoPE (`partial_rotary_factor`, 0.5 by default), optional per-head layer norms on queries
and keys (`qk_layernorm`), a GELU MLP with biases, a final layer norm with bias and a head
with a bias.

Checkpoint names (``self_attn.dense``, ``mlp.fc1``, ``model.final_layernorm``, ``q_layernorm``)
are mapped onto the shared skeleton's by `checkpoint_tensors` (whole tensors renamed).
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

__all__ = ["PhiConfig", "PhiForCausalLM", "PhiDecoderLayer", "read_phi"]

# PhiConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 8192, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
             "hidden_act": "gelu_new", "bos_token_id": 1, "eos_token_id": 2}

_NAMES = ((r"^model\.final_layernorm\.", "model.norm."),
          (r"^(model\.layers\.\d+\.self_attn)\.dense\.", r"\1.o_proj."),
          (r"^(model\.layers\.\d+\.self_attn)\.q_layernorm\.", r"\1.q_norm."),
          (r"^(model\.layers\.\d+\.self_attn)\.k_layernorm\.", r"\1.k_norm."),
          (r"^(model\.layers\.\d+\.mlp)\.fc1\.", r"\1.c_fc."),
          (r"^(model\.layers\.\d+\.mlp)\.fc2\.", r"\1.c_proj."))


@dataclass(frozen=True, kw_only=True)
class PhiConfig(DecoderConfig):
    """A Phi decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_phi(json.load(open("phi-2/config.json")))
        cfg.rope.partial_rotary_factor        # 0.4
    """

    qk_layernorm: bool = False


def read_phi(d: dict[str, Any]) -> PhiConfig:
    """The `PhiConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps",
                          rope_kw={"partial_rotary_factor": 0.5})
    activation(fields["hidden_act"])
    if fields["head_dim"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError("head_dim must be hidden_size / num_attention_heads for phi")
    return PhiConfig(**fields, qk_layernorm=bool(d.get("qk_layernorm", False)))


class PhiDecoderLayer(DecoderLayer):
    def __init__(self, config: PhiConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        norms = dict(q_norm=nn.LayerNorm(d, eps=eps), k_norm=nn.LayerNorm(d, eps=eps)) \
            if config.qk_layernorm else {}
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=True, o_bias=True, **norms)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        return x + self.self_attn(normed, rope, mask, cache) + self.mlp(normed)


class PhiForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["PhiDecoderLayer"]

    def __init__(self, config: PhiConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, PhiDecoderLayer, norm=norm))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.tie_weights()

    @classmethod
    def checkpoint_tensors(cls, config: PhiConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Phi's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("phi",), read_phi, PhiForCausalLM))
