"""GPT-Neo (EleutherAI's gpt-neo-125M/1.3B/2.7B): GPT-2's skeleton (learned positions,
biased layer norms, a ``gelu_new`` MLP, a tied head) with separate bias-free q/k/v
projections, a biased output projection, unscaled attention scores, and layers that
alternate global attention with local attention over the last ``window_size`` tokens
(``attention_types``, e.g. ``[[["global", "local"], 12]]``).

Checkpoint names are GPT-Neo's own (``transformer.h.{i}.attn.attention.q_proj``), mapped
onto the shared skeleton's; the causal masks old exports saved are not read.
transformers computes the scores in float32 whatever the dtype; here they are computed
in the activations' dtype (the same in float32).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..checkpoint.types import TensorMeta
from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import PreNormDecoderLayer, rename_tensors
from .common.layers import PlainMLP, activation
from .common.rope import RopeParams
from .gpt2 import GPT2ForCausalLM
from .registry import ModelFamily, register_family

__all__ = ["GPTNeoConfig", "GPTNeoForCausalLM", "read_gpt_neo"]

# GPTNeoConfig's defaults (transformers 5), under its own key names.
_DEFAULTS = {"vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2048, "num_layers": 24,
             "num_heads": 16, "window_size": 256, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256}
_KINDS = ("global", "local")

_NAMES = ((r"^(?:transformer\.)?wte\.", "model.embed_tokens."),
          (r"^(?:transformer\.)?wpe\.", "model.wpe."),
          (r"^(?:transformer\.)?ln_f\.", "model.norm."),
          (r"^(?:transformer\.)?h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
          (r"^(?:transformer\.)?h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
          (r"^(?:transformer\.)?h\.(\d+)\.attn\.attention\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
          (r"^(?:transformer\.)?h\.(\d+)\.attn\.attention\.", r"model.layers.\1.self_attn."),
          (r"^(?:transformer\.)?h\.(\d+)\.mlp\.", r"model.layers.\1.mlp."))
_MASK_BUFFERS = re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.attention\.(masked_)?bias$")


@dataclass(frozen=True, kw_only=True)
class GPTNeoConfig(DecoderConfig):
    """A GPT-Neo decoder. Example::

        cfg = read_gpt_neo(json.load(open("gpt-neo-125M/config.json")))
        cfg.attention_layers[:2], cfg.window_size      # ('global', 'local'), 256
    """

    attention_layers: tuple[str, ...]
    window_size: int


def read_gpt_neo(d: dict[str, Any]) -> GPTNeoConfig:
    """The `GPTNeoConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k not in _DEFAULTS}}
    layers, heads = positive_int(d, "num_layers"), positive_int(d, "num_heads")
    hidden, window = positive_int(d, "hidden_size"), positive_int(d, "window_size")
    kinds = _attention_layers(d.get("attention_types", [[["global", "local"], layers // 2]]), layers)
    d.pop("head_dim", None)
    d.pop("num_key_value_heads", None)
    fields = read_decoder({**d, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": d.get("intermediate_size") or 4 * hidden,
                           "hidden_act": d["activation_function"]},
                          defaults={"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5},
                          eps_key="layer_norm_epsilon", rope=RopeParams())
    activation(fields["hidden_act"], "activation_function")
    if fields["head_dim"] * heads != hidden:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_heads ({heads})")
    fields["num_key_value_heads"] = heads
    return GPTNeoConfig(**fields, attention_layers=kinds, window_size=window)


def _attention_layers(types: Any, layers: int) -> tuple[str, ...]:
    """`attention_types` (``[[kinds, repeats], ...]``) expanded to one kind per layer, as
    transformers expands it; ValueError naming the field when it is malformed."""
    try:
        kinds = tuple(kind for pattern, repeats in types for _ in range(repeats) for kind in pattern)
    except (TypeError, ValueError):
        raise ValueError(f"attention_types must be [[[kinds...], repeats], ...], got {types!r}") from None
    if len(kinds) != layers or any(k not in _KINDS for k in kinds):
        raise ValueError(f"attention_types must give num_layers ({layers}) layers of 'global' or "
                         f"'local'; it gives {list(kinds)!r}")
    return kinds


class GPTNeoDecoderLayer(PreNormDecoderLayer):
    """GPT-2's layer with separate q/k/v, unscaled scores and, for a local layer, a window."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        local = config.attention_layers[layer_idx] == "local"
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention(hidden=h, heads=config.num_attention_heads, kv_heads=config.num_attention_heads,
                                   head_dim=config.head_dim, layer_key=str(layer_idx), o_bias=True, scale=1.0,
                                   sliding_window=config.window_size if local else None, rope_key=None)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act)


class GPTNeoForCausalLM(GPT2ForCausalLM):
    _no_split_modules = ["GPTNeoDecoderLayer"]
    layer_class = GPTNeoDecoderLayer

    @classmethod
    def checkpoint_tensors(cls, config: GPTNeoConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """GPT-Neo's names onto the skeleton's, without the saved causal masks."""
        return rename_tensors({k: m for k, m in tensors.items() if not _MASK_BUFFERS.match(k)}, _NAMES)


register_family(ModelFamily(("gpt_neo",), read_gpt_neo, GPTNeoForCausalLM))
