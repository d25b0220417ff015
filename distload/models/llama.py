"""The Llama family (llama, mistral, qwen2): its config and decoder, on the shared
skeleton of `distload.models.common`.

The three architectures differ only in a few switches (biases, sliding windows), so one
config and one decoder layer serve them all. Weight names are Hugging Face's; the numerics
follow transformers' `modeling_llama.py` (RMSNorm in float32, RoPE cos/sin in float32 then
cast, SDPA attention), so logits match it to float32 round-off.

    ids -> embed_tokens -> [input_layernorm -> self_attn -> +residual
                            -> post_attention_layernorm -> mlp -> +residual] x N -> norm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common.attention import Attention, attention_mask_bias
from .common.config import DecoderConfig, qwen_layer_types, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm
from .common.rope import RotaryEmbedding, rope_inv_freq as _inv_freq
from .registry import ModelFamily, register_family

__all__ = ["LlamaConfig", "LLAMA_FAMILY_TYPES", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer",
           "LlamaMLP", "RMSNorm", "RotaryEmbedding", "rope_inv_freq", "attention_mask_bias"]

LLAMA_FAMILY_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
# transformers' per-model defaults for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(DecoderConfig):
    """The architecture of one Llama-family decoder.

    `attention_bias` is the q/k/v bias; `o_proj_bias` follows from it and the model type.
    `sliding_window` is the window of the layers that slide: every layer for mistral, the
    layers `layer_types` marks ``"sliding_attention"`` for qwen2.

    Example::

        cfg = LlamaConfig.from_dict(json.load(open("ckpt/config.json")))
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    """

    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def o_proj_bias(self) -> bool:
        # llama's `attention_bias` covers o_proj too; qwen2 has q/k/v bias only.
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """transformers 4's ``rope_scaling``: None for plain RoPE, else ``rope_type`` and
        that type's parameters."""
        return self.rope.scaling_dict()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face `config.json` dict; raises ValueError on an unsupported
        model type, RoPE type or activation, or on a missing required key."""
        model_type = d.get("model_type")
        if model_type not in LLAMA_FAMILY_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; distload supports "
                             f"{', '.join(LLAMA_FAMILY_TYPES)}")
        fields = read_decoder(d, defaults={"max_position_embeddings": _DEFAULT_MAX_POSITIONS[model_type]})
        if fields["hidden_act"] not in ("silu", "swish"):
            raise ValueError(f"hidden_act {fields['hidden_act']!r} is not supported for {model_type} "
                             "(only silu)")
        if fields["rope"].partial_rotary_factor != 1.0:
            raise ValueError(f"partial_rotary_factor != 1 is not supported for {model_type}")
        window, layer_types = _read_sliding_window(d, model_type, fields["num_hidden_layers"])
        # qwen2 always has q/k/v biases; mistral never; llama as its config says.
        qkv_bias = model_type == "qwen2" or (model_type == "llama" and bool(d.get("attention_bias")))
        return cls(**fields, sliding_window=window, layer_types=layer_types, attention_bias=qkv_bias,
                   mlp_bias=bool(model_type == "llama" and d.get("mlp_bias", False)))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4 and 5) and `from_dict` both read back
        to this architecture."""
        d = {k: getattr(self, k) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
            "hidden_act", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")}
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            if self.layer_types is not None:
                d["layer_types"] = list(self.layer_types)
        else:  # only LlamaConfig knows these switches
            d["attention_bias"], d["mlp_bias"] = self.attention_bias, self.mlp_bias
        return d


def _read_sliding_window(d: dict[str, Any], model_type: str, layers: int
                         ) -> tuple[int | None, tuple[str, ...] | None]:
    if model_type == "llama":
        return None, None
    if model_type == "mistral":  # every layer; 4096 when the key is absent, as transformers
        return d.get("sliding_window", 4096), None
    return qwen_layer_types(d, layers)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32) of `config`, as transformers'
    `ROPE_INIT_FUNCTIONS` compute them ("default", "linear", "llama3", "yarn").

    Example::

        inv_freq = rope_inv_freq(cfg, "cuda:0")
    """
    return _inv_freq(config.rope, config.head_dim, device)


class LlamaMLP(GatedMLP):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, act=config.hidden_act,
                         bias=config.mlp_bias)


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm attention then pre-norm MLP, each with a residual; the unit a pipeline
    never splits."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=config.attention_bias,
                                             o_bias=config.o_proj_bias)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = LlamaMLP(config)


class LlamaModel(DecoderModel):
    """Embedding, decoder layers and final norm; each may be absent in a pipeline stage."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, LlamaDecoderLayer, norm=RMSNorm(config.hidden_size, config.rms_norm_eps))


class LlamaForCausalLM(DecoderForCausalLM):
    """A Llama-family causal LM with Hugging Face weight names.

    Example::

        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        del model.model.layers["3"]; model.model.norm = model.lm_head = None  # a first stage
        distload.meta.materialize(model, "cpu")   # allocate, keep ties, init RoPE buffers
        model.load_state_dict(tensors, assign=True)
        hidden = model(ids, position_ids=torch.arange(ids.shape[1])[None])
    """

    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, LlamaModel(config))


register_family(ModelFamily(LLAMA_FAMILY_TYPES, LlamaConfig.from_dict, LlamaForCausalLM))
