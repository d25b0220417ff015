"""The model types transformers runs as `LlamaForCausalLM` under a config class of their
own: InternLM 3, IQuest-Coder and EXAONE 3 (3.0, 3.5). Llama's decoder (`attention_bias`
on q/k/v/o, `mlp_bias` on the MLP); what differs is each config's defaults, its key
aliases (transformers' ``attribute_map``: InternLM 3's `qkv_bias` and `bias`, EXAONE's
`num_layers`, `layer_norm_epsilon`, `activation_function`) and, for EXAONE, the
checkpoint's names (``transformer.h.{i}.attn.attention.q_proj`` ...), mapped onto Llama's
by `checkpoint_tensors` (whole tensors renamed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.types import TensorMeta
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, rename_tensors
from .common.layers import RMSNorm, activation
from .llama import LlamaDecoderLayer
from .registry import ModelFamily, register_family

__all__ = ["LlamaVariantConfig", "LlamaVariantForCausalLM", "read_llama_variant", "LLAMA_VARIANT_TYPES"]

# Each type's config defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "internlm3": {"intermediate_size": 10240, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                  "num_key_value_heads": 2, "head_dim": 128, "pad_token_id": 2, "bos_token_id": 1,
                  "eos_token_id": 2},
    "iquestcoder": {"intermediate_size": 27648, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                    "num_key_value_heads": 8, "head_dim": 128, "bos_token_id": 1, "eos_token_id": 2},
    "exaone": {"intermediate_size": 14336, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500_000.0,
               "num_key_value_heads": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 361},
}
LLAMA_VARIANT_TYPES = tuple(_DEFAULTS)
# transformers' attribute_map of each type: config.json's alias -> the field's name
_ALIASES = {"internlm3": {"qkv_bias": "attention_bias", "bias": "mlp_bias"},
            "exaone": {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                       "activation_function": "hidden_act"}}
_NAMES = {"exaone": ((r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.ln_f\.", "model.norm."),
                     (r"^transformer\.h\.(\d+)\.attn\.attention\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
                     (r"^transformer\.h\.(\d+)\.attn\.attention\.", r"model.layers.\1.self_attn."),
                     (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
                     (r"^transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
                     (r"^transformer\.h\.(\d+)\.mlp\.c_fc_0\.", r"model.layers.\1.mlp.gate_proj."),
                     (r"^transformer\.h\.(\d+)\.mlp\.c_fc_1\.", r"model.layers.\1.mlp.up_proj."),
                     (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."))}


@dataclass(frozen=True, kw_only=True)
class LlamaVariantConfig(DecoderConfig):
    """A Llama decoder under another model type. Example::

        cfg = read_llama_variant(json.load(open("internlm3-8b-instruct/config.json")))
    """

    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias


def read_llama_variant(d: dict[str, Any]) -> LlamaVariantConfig:
    """The `LlamaVariantConfig` of an internlm3, iquestcoder or exaone config.json dict;
    ValueError naming an unsupported field (by the name config.json gives it)."""
    model_type = d["model_type"]
    aliases = _ALIASES.get(model_type, {})
    for key in ("attention_bias", "mlp_bias", *(a for a, k in aliases.items() if k.endswith("_bias"))):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise ValueError(f"{key} must be true or false, not {d[key]!r}")
    d = dict(d)
    for alias, key in aliases.items():
        if d.get(key) is None and d.get(alias) is not None:
            d[key] = d[alias]
    fields = read_decoder(d, defaults=_DEFAULTS[model_type])
    activation(fields["hidden_act"])
    return LlamaVariantConfig(**fields, attention_bias=bool(d.get("attention_bias", False)),
                              mlp_bias=bool(d.get("mlp_bias", False)))


class LlamaVariantForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: LlamaVariantConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, LlamaDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: LlamaVariantConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """EXAONE's original names onto Llama's (names already Llama's pass through)."""
        rules = _NAMES.get(config.model_type)
        return rename_tensors(tensors, rules) if rules else tensors


register_family(ModelFamily(LLAMA_VARIANT_TYPES, read_llama_variant, LlamaVariantForCausalLM))
