"""StableLM (2, and Zephyr/Code variants): layer norms with biases; attention with
optional q/k/v biases (`use_qkv_bias`), partial RoPE (0.25 by default) and optional layer
norms on queries and keys with one weight per head (`qk_layernorm`: ``q_layernorm.norms.
{h}.weight``); a gated SiLU MLP; attention and MLP in sequence or, with
`use_parallel_residual`, in parallel from one norm (``x + attn(n(x)) + mlp(n(x))``)."""

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
from .common.layers import GatedMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["StableLmConfig", "StableLmForCausalLM", "StableLmDecoderLayer", "PerHeadLayerNorm",
           "read_stablelm"]

# StableLmConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 6912, "max_position_embeddings": 4096, "layer_norm_eps": 1e-5,
             "num_key_value_heads": 32, "bos_token_id": 0, "eos_token_id": 0}
_NAMES = ((r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
          (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."))


@dataclass(frozen=True, kw_only=True)
class StableLmConfig(DecoderConfig):
    """A StableLM decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_stablelm(json.load(open("stablelm-2-1_6b/config.json")))
        cfg.rope.partial_rotary_factor        # 0.25
    """

    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False


def read_stablelm(d: dict[str, Any]) -> StableLmConfig:
    """The `StableLmConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = {k: v for k, v in d.items() if k != "head_dim"}   # transformers: hidden / heads, always
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="layer_norm_eps",
                          rope_kw={"partial_rotary_factor": 0.25})
    activation(fields["hidden_act"])
    if fields["head_dim"] * fields["num_attention_heads"] != fields["hidden_size"]:
        raise ValueError(f"hidden_size ({fields['hidden_size']}) must be a multiple of "
                         f"num_attention_heads ({fields['num_attention_heads']}) for stablelm")
    flags = {}
    for key in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual"):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise ValueError(f"{key} must be true or false, not {d[key]!r}")
        flags[key] = bool(d.get(key, False))
    return StableLmConfig(**fields, **flags)


class PerHeadLayerNorm(nn.Module):
    """A bias-free layer norm per head, each with its own weight (``norms.{h}.weight``), over
    ``[..., heads, head_dim]``."""

    def __init__(self, heads: int, dim: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([norm(x[..., i, :]) for i, norm in enumerate(self.norms)], dim=-2)


class StableLmDecoderLayer(DecoderLayer):
    def __init__(self, config: StableLmConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, d = config.hidden_size, config.rms_norm_eps, config.head_dim
        norms = dict(q_norm=PerHeadLayerNorm(config.num_attention_heads, d, eps),
                     k_norm=PerHeadLayerNorm(config.num_key_value_heads, d, eps)) if config.qk_layernorm else {}
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=config.use_qkv_bias, **norms)
        if not config.use_parallel_residual:
            self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)
        self.parallel = config.use_parallel_residual

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        normed = self.input_layernorm(x)
        if self.parallel:
            return x + self.self_attn(normed, rope, mask, cache) + self.mlp(normed)
        x = x + self.self_attn(normed, rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class StableLmForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["StableLmDecoderLayer"]

    def __init__(self, config: StableLmConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, StableLmDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: StableLmConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """StableLM's per-head norm names onto `Attention`'s."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("stablelm",), read_stablelm, StableLmForCausalLM, unread=("head_dim",)))
