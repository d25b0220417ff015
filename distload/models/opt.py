"""OPT (Meta's OPT-125M ... OPT-66B, and the models trained from them): learned absolute
position embeddings with OPT's offset of 2 rows, full multi-head attention with biases
(queries scaled by head_dim ** -0.5), a plain ReLU MLP (``fc1``, ``fc2``), layer norms,
and a head tied to the token embeddings.

Two layer shapes: pre-norm (``do_layer_norm_before``, every size but 350M) with a final
layer norm, and post-norm (OPT-350M), without it. Where the embeddings are narrower than
the layers (``word_embed_proj_dim``, OPT-350M's 512 against 1024), ``project_in`` widens
them on the first stage and ``project_out`` narrows the last hidden states for the head.

Checkpoint names are OPT's own, with (``model.decoder.layers.{i}.fc1``, what transformers
writes) or without (``decoder.layers...``, some hub files) the ``model.`` prefix, mapped
onto the shared skeleton's (whole tensors renamed). The position table (and
``project_in``) stay on the embedding's stage (`joined_units`); calls longer than
``max_position_embeddings`` are refused before they start (`max_positions`).
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
from .common.rope import RopeParams
from .registry import ModelFamily, register_family

__all__ = ["OPTConfig", "OPTForCausalLM", "OPTDecoderLayer", "read_opt"]

# OPTConfig's defaults (transformers 5), under its own key names.
_DEFAULTS = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
             "max_position_embeddings": 2048, "num_attention_heads": 12, "activation_function": "relu",
             "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
_OFFSET = 2   # OPT's position table starts 2 rows in (fairseq's padding positions)

_DECODER = r"^(?:model\.)?decoder\."
_NAMES = ((_DECODER + r"embed_tokens\.", "model.embed_tokens."),
          (_DECODER + r"embed_positions\.", "model.embed_positions."),
          (_DECODER + r"project_in\.", "model.project_in."),
          (_DECODER + r"project_out\.", "model.norm.project_out."),
          (_DECODER + r"final_layer_norm\.", "model.norm.final_layer_norm."),
          (_DECODER + r"layers\.(\d+)\.self_attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
          (_DECODER + r"layers\.(\d+)\.fc1\.", r"model.layers.\1.mlp.c_fc."),
          (_DECODER + r"layers\.(\d+)\.fc2\.", r"model.layers.\1.mlp.c_proj."),
          (_DECODER + r"layers\.", "model.layers."))


@dataclass(frozen=True, kw_only=True)
class OPTConfig(DecoderConfig):
    """An OPT decoder. Example::

        cfg = read_opt(json.load(open("opt-350m/config.json")))
        cfg.word_embed_proj_dim, cfg.do_layer_norm_before      # 512, False
    """

    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True


def read_opt(d: dict[str, Any]) -> OPTConfig:
    """The `OPTConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k not in _DEFAULTS}}
    for key in ("do_layer_norm_before", "_remove_final_layer_norm", "enable_bias",
                "layer_norm_elementwise_affine"):
        if not isinstance(d.get(key, False), bool):
            raise ValueError(f"{key} must be true or false, got {d[key]!r}")
    ffn = positive_int(d, "ffn_dim")
    d.pop("head_dim", None)   # hidden / heads, always
    fields = read_decoder({**d, "intermediate_size": ffn, "hidden_act": d["activation_function"]},
                          defaults={"tie_word_embeddings": True, "layer_norm_eps": 1e-5},
                          eps_key="layer_norm_eps", rope=RopeParams())
    activation(fields["hidden_act"], "activation_function")
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    if fields["head_dim"] * heads != hidden:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    fields["num_key_value_heads"] = heads
    pre = d.get("do_layer_norm_before", True)
    width = d.get("word_embed_proj_dim")
    return OPTConfig(**fields, word_embed_proj_dim=hidden if width is None else positive_int(d, "word_embed_proj_dim"),
                     do_layer_norm_before=pre, final_layer_norm=pre and not d.get("_remove_final_layer_norm", False),
                     enable_bias=d.get("enable_bias", True),
                     layer_norm_elementwise_affine=d.get("layer_norm_elementwise_affine", True))


def _layer_norm(config: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps,
                        elementwise_affine=config.layer_norm_elementwise_affine)


class OPTDecoderLayer(DecoderLayer):
    """Pre-norm ``x + attn(ln(x))``, ``+ mlp(ln(x))``, or post-norm ``ln(x + attn(x))``,
    ``ln(x + mlp(x))`` (OPT-350M)."""

    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.enable_bias
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = Attention(hidden=h, heads=config.num_attention_heads, kv_heads=config.num_attention_heads,
                                   head_dim=config.head_dim, layer_key=str(layer_idx), qkv_bias=bias,
                                   o_bias=bias, rope_key=None)
        self.self_attn_layer_norm = _layer_norm(config)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act, bias=bias)
        self.final_layer_norm = _layer_norm(config)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), rope, mask, cache)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, rope, mask, cache))
        return self.final_layer_norm(x + self.mlp(x))


class OPTFinal(nn.Module):
    """What runs after the last layer, before the head: the final layer norm (pre-norm
    models) and ``project_out`` (narrow embeddings), each where the config has it."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.final_layer_norm = _layer_norm(config) if config.final_layer_norm else None
        narrow = config.word_embed_proj_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if narrow else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return h if self.project_out is None else self.project_out(h)


class OPTModel(DecoderModel):
    """The shared skeleton with the position table (and ``project_in``) after the embedding."""

    def __init__(self, config: OPTConfig) -> None:
        width, hidden = config.word_embed_proj_dim, config.hidden_size
        after = {"embed_positions": nn.Embedding(config.max_position_embeddings + _OFFSET, hidden)}
        if width != hidden:
            after["project_in"] = nn.Linear(width, hidden, bias=False)
        final = OPTFinal(config)
        has_final = final.final_layer_norm is not None or final.project_out is not None
        super().__init__(config, OPTDecoderLayer, norm=final if has_final else None, after_embed=after)
        self.embed_tokens = nn.Embedding(config.vocab_size, width)   # (keeps its place: first)

    def begin(self, x: torch.Tensor, position_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.embed_tokens is None:
            return x, {}
        h = self.embed_tokens(x)
        if getattr(self, "project_in", None) is not None:
            h = self.project_in(h)
        return h + self.embed_positions(position_ids + _OFFSET), {}


class OPTForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["OPTDecoderLayer", "OPTFinal"]   # the final norm and project_out: one unit

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config, OPTModel(config))
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def max_positions(self) -> int:
        """Positions the learned table has: a call's prompt plus new tokens must fit."""
        return self.config.max_position_embeddings

    def joined_units(self) -> tuple[str, ...]:
        narrow = self.config.word_embed_proj_dim != self.config.hidden_size
        return ("model.embed_positions",) + (("model.project_in",) if narrow else ())

    @classmethod
    def checkpoint_tensors(cls, config: OPTConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """OPT's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("opt",), read_opt, OPTForCausalLM))
