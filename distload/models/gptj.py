"""GPT-J (and CodeGen, its fused-q/k/v variant): one layer norm (with bias) feeding attention and MLP in parallel,
``x + attn(ln_1(x)) + mlp(ln_1(x))``; bias-free q/k/v/out projections; RoPE on interleaved
channel pairs of the first `rotary_dim` channels of each head (base 10000); a GELU MLP
with biases; a head with a bias.

Config keys are GPT-2's (`n_embd`, `n_layer`, `n_head`, `n_positions`, `n_inner`,
`activation_function`, `layer_norm_epsilon`); checkpoint names (``transformer.h.{i}.attn.
q_proj``, ``mlp.fc_in``, ``transformer.ln_f`` ...) are mapped onto the shared skeleton's by
`checkpoint_tensors` (whole tensors renamed).

CodeGen fuses the projections into one ``qkv_proj`` laid out in 4 blocks (its training
shards), each holding that block's query, value and key rows, in that order.
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
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import PlainMLP, activation
from .common.rope import RopeParams, rotary_dim
from .registry import ModelFamily, register_family

__all__ = ["GPTJConfig", "GPTJForCausalLM", "GPTJDecoderLayer", "CodeGenForCausalLM", "read_gptj", "read_codegen",
           "gpt2_keys"]

_NAMES = ((r"^transformer\.wte\.", "model.embed_tokens."),
          (r"^transformer\.ln_f\.", "model.norm."),
          (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
          (r"^transformer\.h\.(\d+)\.attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
          (r"^transformer\.h\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
          (r"^transformer\.h\.(\d+)\.mlp\.fc_in\.", r"model.layers.\1.mlp.c_fc."),
          (r"^transformer\.h\.(\d+)\.mlp\.fc_out\.", r"model.layers.\1.mlp.c_proj."))
# GPT-2-style config keys -> the shared names (transformers' attribute_map)
_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings", "n_inner": "intermediate_size",
              "activation_function": "hidden_act", "layer_norm_epsilon": "layer_norm_eps"}


def gpt2_keys(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`d` with GPT-2's key names (`n_embd`, ...) checked (ValueError naming them) and copied
    to the shared ones; `defaults` fills GPT-2-named keys `d` lacks."""
    d = {**defaults, **{k: v for k, v in d.items() if v is not None or k not in defaults}}
    for key in ("n_embd", "n_layer", "n_head", "n_positions"):
        positive_int(d, key)
    if d.get("n_inner") is not None:
        positive_int(d, "n_inner")
    return {**d, **{new: d[old] for old, new in _GPT2_KEYS.items() if d.get(old) is not None}}


# GPTJConfig's defaults (transformers 5), under its own key names.
_DEFAULTS = {"n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 50256,
             "eos_token_id": 50256}


@dataclass(frozen=True, kw_only=True)
class GPTJConfig(DecoderConfig):
    """A GPT-J decoder (`rms_norm_eps` holds `layer_norm_epsilon`). Example::

        cfg = read_gptj(json.load(open("gpt-j-6b/config.json")))
        cfg.rope.partial_rotary_factor      # 0.25
    """


def read_gptj(d: dict[str, Any]) -> GPTJConfig:
    """The `GPTJConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = gpt2_keys(d, _DEFAULTS)
    d.pop("head_dim", None)   # hidden / heads, always
    hidden = d["hidden_size"]
    fields = read_decoder(d, defaults={"intermediate_size": 4 * hidden, "layer_norm_eps": 1e-5},
                          eps_key="layer_norm_eps", rope=RopeParams())
    activation(fields["hidden_act"], "activation_function")
    head_dim = fields["head_dim"]
    if head_dim * fields["num_attention_heads"] != hidden:
        raise ValueError(f"n_embd ({hidden}) must be a multiple of n_head ({fields['num_attention_heads']})")
    rotary = positive_int(d, "rotary_dim")
    rope = RopeParams(theta=10000.0, partial_rotary_factor=rotary / head_dim)
    if rotary > head_dim or rotary % 2 or rotary_dim(rope, head_dim) != rotary:
        raise ValueError(f"rotary_dim ({rotary}) must be an even number of channels of a head ({head_dim})")
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    return GPTJConfig(**fields | {"rope": rope})


class GPTJDecoderLayer(DecoderLayer):
    def __init__(self, config: GPTJConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        self.self_attn = Attention.for_layer(config, layer_idx, interleaved_rope=True)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        return x + self.self_attn(normed, rope, mask, cache) + self.mlp(normed)


class GPTJForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GPTJDecoderLayer"]

    def __init__(self, config: GPTJConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, GPTJDecoderLayer, norm=norm, interleaved_rope=True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.tie_weights()

    @classmethod
    def checkpoint_tensors(cls, config: GPTJConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """GPT-J's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("gptj",), read_gptj, GPTJForCausalLM))


_CODEGEN_BLOCKS = 4   # transformers' `mp_num`


def read_codegen(d: dict[str, Any]) -> GPTJConfig:
    """The config of a codegen config.json dict (GPT-J's fields and defaults); ValueError
    naming an unsupported field."""
    config = read_gptj(d)
    if config.num_attention_heads % _CODEGEN_BLOCKS:
        raise ValueError(f"n_head ({config.num_attention_heads}) must be a multiple of {_CODEGEN_BLOCKS} for "
                         "codegen (its qkv_proj holds 4 blocks of whole heads)")
    return config


class CodeGenAttention(Attention):
    """One ``qkv_proj`` of 4 blocks, each ``[query, value, key]`` rows of a quarter of the heads."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        local = self.num_heads * self.head_dim // _CODEGEN_BLOCKS
        q, v, k = self.qkv_proj(x).view(b, t, _CODEGEN_BLOCKS, 3 * local).split(local, dim=-1)
        return q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)


class CodeGenDecoderLayer(GPTJDecoderLayer):
    def __init__(self, config: GPTJConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.self_attn = CodeGenAttention(
            hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.num_attention_heads,
            head_dim=config.head_dim, layer_key=str(layer_idx), fused_qkv=True, rope_key="rotary_emb",
            interleaved_rope=True)


class CodeGenForCausalLM(GPTJForCausalLM):
    _no_split_modules = ["CodeGenDecoderLayer"]

    def __init__(self, config: GPTJConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        DecoderForCausalLM.__init__(self, config, DecoderModel(config, CodeGenDecoderLayer, norm=norm,
                                                               interleaved_rope=True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.tie_weights()


register_family(ModelFamily(("codegen",), read_codegen, CodeGenForCausalLM))
