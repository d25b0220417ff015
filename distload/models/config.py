"""One frozen config for the Llama family (llama, mistral, qwen2), read from a Hugging
Face `config.json` dict.

The three architectures differ only in a few switches (biases, sliding window), so one
dataclass and one decoder (`distload.models.llama`) serve them all. Everything the model
needs is resolved here, once: defaults, the RoPE parameters in either the transformers 4
(`rope_theta` + `rope_scaling`) or 5 (`rope_parameters`) layout, per-layer sliding windows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LlamaConfig", "LLAMA_FAMILY_TYPES", "SUPPORTED_ROPE_TYPES"]

LLAMA_FAMILY_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
# transformers' per-model defaults for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_SLIDING, _FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture of one Llama-family decoder.

    `rope_scaling` is None for plain RoPE, else a dict with ``rope_type`` ("linear" or
    "llama3") and that type's parameters (never ``rope_theta``, which has its own field).
    `attention_bias` is the q/k/v bias; `o_proj_bias` follows from it and the model type.
    `sliding_window` is the window of the layers that slide: every layer for mistral, the
    layers `layer_types` marks ``"sliding_attention"`` for qwen2.

    Example::

        cfg = LlamaConfig.from_dict(json.load(open("ckpt/config.json")))
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")

    def __hash__(self) -> int:  # `rope_scaling` is a dict, which the generated hash rejects
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def o_proj_bias(self) -> bool:
        # llama's `attention_bias` covers o_proj too; qwen2 has q/k/v bias only.
        return self.attention_bias and self.model_type != "qwen2"

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of layer `layer_idx`, None where it attends to everything."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != _SLIDING:
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face `config.json` dict; raises ValueError on an unsupported
        model type, RoPE type or activation, or on a missing required key."""
        model_type = d.get("model_type")
        if model_type not in LLAMA_FAMILY_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; distload supports "
                             f"{', '.join(LLAMA_FAMILY_TYPES)}")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json of a {model_type} model lacks {', '.join(missing)}")
        hidden_act = _value(d, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only silu)")
        heads = d["num_attention_heads"]
        layers = d["num_hidden_layers"]
        max_pos = _value(d, "max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
        rope_theta, rope_scaling = _read_rope(d, max_pos)
        window, layer_types = _read_sliding_window(d, model_type, layers)
        dtype = d.get("dtype") or d.get("torch_dtype")
        # qwen2 always has q/k/v biases; mistral never; llama as its config says.
        qkv_bias = model_type == "qwen2" or (model_type == "llama" and bool(d.get("attention_bias")))
        eos = d.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(_value(d, "rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(_value(d, "tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            mlp_bias=bool(model_type == "llama" and d.get("mlp_bias", False)),
            sliding_window=window,
            layer_types=layer_types,
            hidden_act="silu",
            torch_dtype=str(dtype).removeprefix("torch.") if dtype else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4 and 5) and `from_dict` both read back
        to this architecture."""
        d = asdict(self) | {"architectures": [_ARCHITECTURES[self.model_type]]}
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) \
            else self.eos_token_id
        del d["layer_types"], d["sliding_window"]
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            if self.layer_types is not None:
                d["layer_types"] = list(self.layer_types)
        if self.model_type != "llama":  # only LlamaConfig knows these switches
            del d["attention_bias"], d["mlp_bias"]
        return d


def _value(d: dict[str, Any], key: str, default: Any) -> Any:
    """`d[key]`, or `default` where the key is absent or null (as transformers reads it)."""
    value = d.get(key)
    return default if value is None else value


def _read_rope(d: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 keeps everything in `rope_parameters`; 4 used `rope_theta` +
    # `rope_scaling` (with `type` or `rope_type`). `rope_scaling` wins, as in transformers.
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be an object, not {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", _value(d, "rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"rope_theta must be a positive number, not {theta!r}")
    theta = float(theta)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; distload supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"RoPE type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ValueError(f"RoPE type 'llama3' needs {key!r}")
    return theta, {
        "rope_type": "llama3",
        "factor": float(params["factor"]),
        "low_freq_factor": float(params["low_freq_factor"]),
        "high_freq_factor": float(params["high_freq_factor"]),
        "original_max_position_embeddings": int(
            params.get("original_max_position_embeddings") or max_pos),
    }


def _read_sliding_window(d: dict[str, Any], model_type: str, layers: int
                         ) -> tuple[int | None, tuple[str, ...] | None]:
    if model_type == "llama":
        return None, None
    # Both default to a 4096 window when the key is absent, as transformers does.
    window = d.get("sliding_window", 4096)
    if model_type == "mistral" or window is None:
        return window, None
    if not d.get("use_sliding_window", False):
        return None, None
    layer_types = d.get("layer_types") or [
        _SLIDING if i >= d.get("max_window_layers", 28) else _FULL for i in range(layers)]
    if _SLIDING not in layer_types:
        return None, None
    return window, tuple(layer_types)
