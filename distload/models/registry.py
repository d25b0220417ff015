"""The model registry: `model_type` (from config.json) → the family that builds it.

A family file registers itself once, at import::

    register_family(ModelFamily(("llama", "mistral", "qwen2"), LlamaConfig.from_dict,
                                LlamaForCausalLM))

and `distload.models` imports each family file (one line per family). Nothing outside
`distload.models` names a model type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .validate import validate_config

__all__ = ["ModelFamily", "register_family", "family_for", "config_from_dict", "build_model",
           "supported_model_types"]


@dataclass(frozen=True)
class ModelFamily:
    """The model types one family file serves, how it reads a config.json dict (raising
    ValueError naming what is wrong), and the `StageModel` class it builds. A
    `nested_text` family is a multimodal type of which distload loads the text model
    alone (its config.json nests it under `text_config`). `unread` names config.json
    fields the family does not read, which `validate_config` then leaves alone (MLA
    has no `num_key_value_heads`). `keep_float32` names (regexes, searched in parameter
    names) the parameters kept in float32 when the load casts to bfloat16 or float16, and
    `keep_float32_fp16` those kept so under float16 only: transformers'
    `_keep_in_fp32_modules_strict` and `_keep_in_fp32_modules` (a router's bias rounded to
    bfloat16 changes which experts are chosen)."""

    model_types: tuple[str, ...]
    read_config: Callable[[dict], Any]
    model_class: Callable[[Any], nn.Module]
    nested_text: bool = False   # a multimodal type of which the text model is loaded
    unread: tuple[str, ...] = ()  # config.json fields the family never reads
    keep_float32: tuple[str, ...] = ()       # kept float32 under a bfloat16/float16 cast
    keep_float32_fp16: tuple[str, ...] = ()  # kept float32 under a float16 cast only

    def float32_params(self, dtype: str | None) -> tuple[str, ...]:
        """The patterns of parameters kept in float32 when the load casts to `dtype` (a
        name; None: no cast, every tensor as stored), by transformers' rule.

        Example::

            family_for({"model_type": "deepseek_v3"}).float32_params("bfloat16")
            # ('\\.gate\\.weight$', '\\.e_score_correction_bias$')
        """
        if dtype == "float16":
            return self.keep_float32 + self.keep_float32_fp16
        return self.keep_float32 if dtype == "bfloat16" else ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` build its model types; a type registered twice is a programming error."""
    for model_type in family.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    """Every registered model type, in registration order."""
    return tuple(_FAMILIES)


def family_for(config: dict) -> ModelFamily:
    """The family of a config.json dict, after `validate_config`; ValueError naming the
    field at fault, or the unsupported `model_type` and the supported ones."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is not None:
        validate_config(config, unread=family.unread)
    if family is None:
        text = config.get("text_config") if isinstance(config, dict) else None
        inner = text.get("model_type") if isinstance(text, dict) else None
        if inner is not None:  # a multimodal checkpoint whose text model is not loadable alone
            nested = [t for t, f in _FAMILIES.items() if getattr(f, "nested_text", False)]
            raise ValueError(
                f"unsupported model_type {model_type!r}: config.json nests a {inner!r} text "
                f"model (text_config, weights under language_model.); distload loads the text "
                f"part of {', '.join(nested) or 'no multimodal type'} only")
        raise ValueError(f"unsupported model_type {model_type!r}; distload supports "
                         f"{', '.join(_FAMILIES)}")
    return family


def config_from_dict(d: dict[str, Any]) -> Any:
    """The model config of a Hugging Face `config.json` dict (see `family_for`).

    Example::

        config_from_dict({"model_type": "gpt2"})  # ValueError: ... supports llama, ...
    """
    return family_for(d).read_config(d)


def build_model(config: Any) -> nn.Module:
    """Construct (not load) the model for `config` — a config.json dict or a family's
    config object — on whatever device context is active (`torch.device("meta")`,
    `distload.init_empty_weights()`, ...).

    Example::

        with init_empty_weights():
            model = build_model(json.load(open("ckpt/config.json")))
        model.model.layers["0"]        # a decoder layer, parameters on meta
    """
    if isinstance(config, dict):
        family = family_for(config)
        return family.model_class(family.read_config(config))
    family = _FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"{type(config).__name__} is not the config of a registered model type")
    return family.model_class(config)
