"""GPT-2 (and DistilGPT2, GPT-2 medium/large/xl) and GPTBigCode (StarCoder, SantaCoder:
GPT-2's layout with `nn.Linear`s and multi-query attention): learned absolute position embeddings
(``wpe``) added to the token embeddings, pre-norm layers with biased layer norms, one
fused q/k/v projection, full multi-head attention without RoPE, a ``gelu_new`` MLP, a
final layer norm and a head tied to the token embeddings.

Its linear layers are `Conv1D`s: weights stored ``[in, out]``, loaded as the checkpoint
holds them. Checkpoint names are GPT-2's own, with (``transformer.h.{i}.attn.c_attn``,
what transformers writes) or without (``h.{i}.attn.c_attn``, the hub's original
``gpt2`` files) the ``transformer.`` prefix; both are mapped onto the shared skeleton's.
Old exports also hold each layer's causal mask (``attn.bias``, ``attn.masked_bias``,
4 MB a layer for GPT-2 small), which no rank reads.

The position table is its own planner unit (``model.wpe``), kept on the embedding's stage
(`joined_units`); positions beyond ``n_positions`` have no embedding, so the model declares
that limit (`max_positions`) and calls longer than it are refused before they start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer, rename_tensors
from .common.layers import Conv1D, PlainMLP, activation
from .common.rope import RopeParams
from .gpt_neox import GPTNeoXAttention
from .gptj import gpt2_keys
from .registry import ModelFamily, register_family

__all__ = ["GPT2Config", "GPT2ForCausalLM", "GPT2DecoderLayer", "read_gpt2", "GPTBigCodeConfig",
           "GPTBigCodeForCausalLM", "read_gpt_bigcode"]

# GPT2Config's defaults (transformers 5), under its own key names.
_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 50256,
             "eos_token_id": 50256}

_PREFIX = r"^(?:transformer\.)?"
_NAMES = ((_PREFIX + r"wte\.", "model.embed_tokens."),
          (_PREFIX + r"wpe\.", "model.wpe."),
          (_PREFIX + r"ln_f\.", "model.norm."),
          (_PREFIX + r"h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
          (_PREFIX + r"h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
          (_PREFIX + r"h\.(\d+)\.attn\.c_attn\.", r"model.layers.\1.self_attn.qkv_proj."),
          (_PREFIX + r"h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
          (_PREFIX + r"h\.(\d+)\.mlp\.", r"model.layers.\1.mlp."))
# the causal-mask buffers old exports saved (transformers ignores them too)
_MASK_BUFFERS = re.compile(_PREFIX + r"h\.\d+\.attn\.(masked_)?bias$")


@dataclass(frozen=True, kw_only=True)
class GPT2Config(DecoderConfig):
    """A GPT-2 decoder (`rms_norm_eps` holds `layer_norm_epsilon`; `max_position_embeddings`
    is `n_positions`, the learned table's length). Example::

        cfg = read_gpt2(json.load(open("gpt2/config.json")))
        cfg.max_position_embeddings, cfg.tie_word_embeddings      # 1024, True
    """

    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False


def read_gpt2(d: dict[str, Any]) -> GPT2Config:
    """The `GPT2Config` of a config.json dict; ValueError naming an unsupported field."""
    return GPT2Config(**_read_fields(d, _DEFAULTS))


def _read_fields(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A GPT-2-style config's `GPT2Config` fields (GPT-2's and GPTBigCode's keys)."""
    if d.get("add_cross_attention"):
        raise ValueError("add_cross_attention: a GPT-2 with cross-attention is an encoder-decoder's "
                         "decoder; distload runs causal LMs only")
    for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if not isinstance(d.get(key, False), bool):
            raise ValueError(f"{key} must be true or false, got {d[key]!r}")
    d = gpt2_keys(d, defaults)
    d.pop("head_dim", None)  # hidden / heads, always
    d.pop("num_key_value_heads", None)   # all heads (GPTBigCode: from multi_query)
    hidden = d["hidden_size"]
    fields = read_decoder(d, defaults={"intermediate_size": 4 * hidden, "layer_norm_eps": 1e-5,
                                       "tie_word_embeddings": True, "max_position_embeddings": 1024},
                          eps_key="layer_norm_eps", rope=RopeParams())
    activation(fields["hidden_act"], "activation_function")
    if fields["head_dim"] * fields["num_attention_heads"] != hidden:
        raise ValueError(f"n_embd ({hidden}) must be a multiple of n_head ({fields['num_attention_heads']})")
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    # reorder_and_upcast_attn and the softmax-in-fp32 switches only change how transformers'
    # eager path rounds: not read
    return dict(fields, scale_attn_weights=d.get("scale_attn_weights", True),
                scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False))


def _scale(config: GPT2Config, layer_idx: int) -> float:
    scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
    return scale / float(layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale


class GPT2DecoderLayer(PreNormDecoderLayer):
    """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))``; every linear a `Conv1D`."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention(hidden=h, heads=config.num_attention_heads,
                                   kv_heads=config.num_attention_heads, head_dim=config.head_dim,
                                   layer_key=str(layer_idx), fused_qkv=True, scale=_scale(config, layer_idx),
                                   rope_key=None)
        # GPT-2's projections, stored [in, out], in place of the Linears (same names)
        self.self_attn.qkv_proj = Conv1D(h, 3 * h)
        self.self_attn.o_proj = Conv1D(h, h)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act, linear=Conv1D)


class GPT2Model(DecoderModel):
    """The shared skeleton with the learned position table ``wpe`` after the embedding."""

    def __init__(self, config: GPT2Config, make_layer=GPT2DecoderLayer) -> None:
        super().__init__(config, make_layer, norm=nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps),
                         after_embed={"wpe": nn.Embedding(config.max_position_embeddings, config.hidden_size)})

    def begin(self, x: torch.Tensor, position_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.embed_tokens is None:
            return x, {}
        return self.embed_tokens(x) + self.wpe(position_ids), {}


class GPT2ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["GPT2DecoderLayer"]
    layer_class = GPT2DecoderLayer

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config, GPT2Model(config, self.layer_class))

    @property
    def max_positions(self) -> int:
        """Positions the learned table has: a call's prompt plus new tokens must fit."""
        return self.config.max_position_embeddings

    def joined_units(self) -> tuple[str, ...]:
        return ("model.wpe",)

    @classmethod
    def checkpoint_tensors(cls, config: GPT2Config, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """GPT-2's names onto the skeleton's, without the saved causal masks."""
        return rename_tensors({k: m for k, m in tensors.items() if not _MASK_BUFFERS.match(k)}, _NAMES)


register_family(ModelFamily(("gpt2",), read_gpt2, GPT2ForCausalLM))


# ----------------------------------------------------------------------------- GPTBigCode

# GPTBigCodeConfig's defaults (transformers 5): GPT-2's, with multi-query attention
_BIGCODE_DEFAULTS = {**_DEFAULTS, "activation_function": "gelu_pytorch_tanh"}


@dataclass(frozen=True, kw_only=True)
class GPTBigCodeConfig(GPT2Config):
    """A GPTBigCode decoder (StarCoder, SantaCoder): GPT-2's layout with `nn.Linear`s and,
    with `multi_query`, one key/value head."""

    multi_query: bool = True


def read_gpt_bigcode(d: dict[str, Any]) -> GPTBigCodeConfig:
    """The `GPTBigCodeConfig` of a config.json dict; ValueError naming an unsupported field."""
    multi_query = d.get("multi_query", True)
    if not isinstance(multi_query, bool):
        raise ValueError(f"multi_query must be true or false, got {multi_query!r}")
    fields = _read_fields(d, _BIGCODE_DEFAULTS)
    if multi_query:
        fields["num_key_value_heads"] = 1
    return GPTBigCodeConfig(**fields, multi_query=multi_query)


class GPTBigCodeDecoderLayer(PreNormDecoderLayer):
    """GPT-2's layer with biased `nn.Linear`s; ``c_attn`` is ``[q, k, v]`` with one k/v
    head (`multi_query`), else per head ``[q_h, k_h, v_h]`` (GPT-NeoX's layout)."""

    def __init__(self, config: GPTBigCodeConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        attention = Attention if config.multi_query else GPTNeoXAttention
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = attention(hidden=h, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                                   head_dim=config.head_dim, layer_key=str(layer_idx), fused_qkv=True,
                                   qkv_bias=True, o_bias=True, scale=_scale(config, layer_idx), rope_key=None)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)


class GPTBigCodeForCausalLM(GPT2ForCausalLM):
    _no_split_modules = ["GPTBigCodeDecoderLayer"]
    layer_class = GPTBigCodeDecoderLayer


register_family(ModelFamily(("gpt_bigcode",), read_gpt_bigcode, GPTBigCodeForCausalLM))
