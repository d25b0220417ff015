"""The fields every built-in decoder's config has, and the readers the family files share
to fill them from a Hugging Face `config.json` dict.

A family's config is a frozen dataclass that extends `DecoderConfig` with its own switches
and reads a dict with ``read_decoder(d, ...)`` plus its own keys. Every problem raises
ValueError naming the config.json field; defaults are those of the family's transformers
config class, for keys a config.json may leave out.

Example::

    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(DecoderConfig):
        logit_scale: float = 1.0

    def read_toy(d):
        return ToyConfig(**read_decoder(d, defaults=TOY_DEFAULTS), logit_scale=d.get("logit_scale", 1.0))
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..validate import validate_config
from .rope import RopeParams, read_rope

__all__ = ["DecoderConfig", "read_decoder", "need", "positive_int", "int_at_least", "positive_number", "value_of",
           "SLIDING", "FULL",
           "text_config", "qwen_layer_types", "read_layer_types"]

SLIDING, FULL = "sliding_attention", "full_attention"
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """What every built-in decoder needs. `layer_types` marks each layer
    ``"sliding_attention"`` (window `sliding_window`) or ``"full_attention"``; None: all
    global. `nested_in` is the outer model type when the text model is nested in a
    multimodal checkpoint (Gemma 3 ≥ 4B: ``"gemma3"``), whose weights sit under
    ``language_model.``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeParams = field(default_factory=RopeParams)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    nested_in: str | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries "
                                 f"for {self.num_hidden_layers} layers (num_hidden_layers)")
            odd = [t for t in self.layer_types if t not in (SLIDING, FULL)]
            if odd:
                raise ValueError(f"layer_types {odd} are not supported "
                                 f"(only {SLIDING!r} and {FULL!r})")

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx`, None where it attends to everything."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != SLIDING:
            return None
        return self.sliding_window


def need(d: dict[str, Any], key: str, model_type: str) -> Any:
    """``d[key]``; ValueError naming the key when it is missing or null."""
    if d.get(key) is None:
        raise ValueError(f"config.json of a {model_type} model lacks {key}")
    return d[key]


def value_of(d: dict[str, Any], key: str, default: Any) -> Any:
    """``d[key]``, or `default` where the key is absent or null (as transformers reads it)."""
    value = d.get(key)
    return default if value is None else value


def positive_int(d: dict[str, Any], key: str, default: Any = None) -> int:
    """``d[key]`` (or `default`, where absent or null) as an int >= 1; ValueError naming
    the key otherwise."""
    value = value_of(d, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, not {value!r}")
    return value


def int_at_least(d: dict[str, Any], key: str, default: Any, least: int) -> int:
    """``d[key]`` (or `default`, where absent or null) as an int >= `least`; ValueError
    naming the key otherwise."""
    value = value_of(d, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key} must be an integer >= {least}, not {value!r}")
    return value


def positive_number(d: dict[str, Any], key: str, default: Any) -> float:
    """``d[key]`` (or `default`, where absent or null) as a float > 0; ValueError naming
    the key otherwise."""
    return _positive(value_of(d, key, default), key)


def read_decoder(d: dict[str, Any], *, defaults: dict[str, Any], eps_key: str = "rms_norm_eps",
                 act_key: str = "hidden_act", rope_kw: dict | None = None,
                 rope: RopeParams | None = None) -> dict[str, Any]:
    """The `DecoderConfig` fields of config.json dict `d`, as keyword arguments; `defaults`
    holds the family's transformers defaults for keys `d` may lack (``head_dim`` among them
    where the family has a fixed default rather than hidden / heads). `rope_kw` goes to
    `read_rope`, unless the family read its RoPE itself (`rope`)."""
    model_type = d.get("model_type")
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if d.get("intermediate_size") is None and defaults.get("intermediate_size") is None:
        missing.append("intermediate_size")
    if missing:
        raise ValueError(f"config.json of a {model_type} model lacks {', '.join(missing)}")
    for key in (*_REQUIRED, "intermediate_size"):
        positive_int(d, key, defaults.get(key))
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or defaults.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or defaults.get("head_dim") or d["hidden_size"] // heads
    max_pos = positive_int(d, "max_position_embeddings", defaults.get("max_position_embeddings", 2048))
    if rope is None:
        rope = read_rope(d, default_theta=defaults.get("rope_theta", 10000.0), max_positions=max_pos,
                         **(rope_kw or {}))
    dtype = d.get("dtype") or d.get("torch_dtype")
    eos = d.get("eos_token_id", defaults.get("eos_token_id"))
    return dict(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d.get("intermediate_size") or defaults["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads"),
        head_dim=positive_int({"head_dim": head_dim}, "head_dim"),
        rms_norm_eps=_positive(value_of(d, eps_key, defaults.get(eps_key, 1e-6)), eps_key),
        rope=rope,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(value_of(d, "tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
        hidden_act=value_of(d, act_key, defaults.get(act_key, "silu")),
        torch_dtype=str(dtype).removeprefix("torch.") if dtype else None,
        bos_token_id=d.get("bos_token_id", defaults.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id", defaults.get("pad_token_id")),
    )


def qwen_layer_types(d: dict[str, Any], layers: int, *, every_layer: bool = False
                     ) -> tuple[int | None, tuple[str, ...] | None]:
    """(window, layer types) of a Qwen config: none unless `use_sliding_window`; then the
XX
    (`every_layer`, Qwen3-MoE) all of them."""
    window = d.get("sliding_window", 4096)
    if not d.get("use_sliding_window", False) or window is None:
        return None, None
    if every_layer:
        return int(window), None
    layer_types = d.get("layer_types") or [
        SLIDING if i >= d.get("max_window_layers", 28) else FULL for i in range(layers)]
    return (int(window), tuple(layer_types)) if SLIDING in layer_types else (None, None)


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be a positive number, not {value!r}")
    return float(value)


def text_config(d: dict[str, Any], outer: str, inner: str, *, unread: Collection[str] = ()) -> dict[str, Any]:
    """The text model's config of a multimodal config.json (`outer` model type) whose
    `text_config` is an `inner` model, validated (`validate_config`, with the fields the
    family does not read in `unread`); ValueError when it is not there, not that, or
    invalid (the message says ``text_config: ...``)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.json of a {outer} model lacks text_config (its text model)")
    text = {"model_type": inner, **text}
    if text["model_type"] != inner:
        raise ValueError(f"text_config.model_type {text['model_type']!r} of a {outer} "
                         f"model is not supported (distload loads a {inner} text model)")
    for key in ("torch_dtype", "dtype", "eos_token_id", "bos_token_id", "pad_token_id"):
        if key not in text and key in d:   # older exports keep these at the top level only
            text[key] = d[key]
    if "tie_word_embeddings" in d:         # the outer model owns the head, and its tie
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    try:
        validate_config(text, unread=unread)
    except ValueError as e:
        raise ValueError(f"text_config: {e}") from None
    return text


def read_layer_types(d: dict[str, Any], layers: int, default: list[str]) -> tuple[str, ...]:
    """config.json's `layer_types` (checked: one entry per layer, each sliding or full), or
    `default` where it is absent."""
    types = d.get("layer_types")
    if types is None:
        return tuple(default)
    if not isinstance(types, list) or len(types) != layers or any(t not in (SLIDING, FULL) for t in types):
        raise ValueError(f"layer_types must list {SLIDING!r} or {FULL!r} for each of the {layers} "
                         f"layers, not {types!r}")
    return tuple(types)
