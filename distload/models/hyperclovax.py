"""HyperCLOVA X (SEED): Granite's decoder and multipliers (`granite.py`) with RMSNorms after
attention and after the MLP (`use_post_norm`, inside the residual, before its
multiplier), an attention scale of ``head_dim ** -0.5`` unless `attention_multiplier` says
otherwise, and the logits *multiplied* by `logits_scaling`.

    layer: x + post_norm1(attn(input_layernorm(x))) * m, then + post_norm2(mlp(...)) * m
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .cache import KVCache
from .common.decoder import DecoderForCausalLM
from .common.layers import RMSNorm
from .granite import GraniteConfig, GraniteDecoderLayer, GraniteForCausalLM, GraniteModel, read_granite
from .registry import ModelFamily, register_family

__all__ = ["HyperClovaXConfig", "HyperClovaXForCausalLM", "HyperClovaXDecoderLayer", "read_hyperclovax"]


@dataclass(frozen=True, kw_only=True)
class HyperClovaXConfig(GraniteConfig):
    """A HyperCLOVA X decoder. Example::

        cfg = read_hyperclovax(json.load(open("HyperCLOVAX-SEED-Think-14B/config.json")))
    """

    use_post_norm: bool = True


def read_hyperclovax(d: dict[str, Any]) -> HyperClovaXConfig:
    """The `HyperClovaXConfig` of a config.json dict; ValueError naming an unsupported field."""
    if d.get("attention_multiplier") is None:
        heads = d.get("num_attention_heads")
        head_dim = d.get("head_dim") or (d["hidden_size"] // heads if isinstance(heads, int) and heads > 0
                                         and isinstance(d.get("hidden_size"), int) else None)
        d = {**d, "attention_multiplier": head_dim ** -0.5 if isinstance(head_dim, int) and head_dim > 0 else 1.0}
    base = read_granite(d)
    post = d.get("use_post_norm", True)
    if post is not None and not isinstance(post, bool):
        raise ValueError(f"use_post_norm must be true or false, not {post!r}")
    return HyperClovaXConfig(**{f.name: getattr(base, f.name) for f in fields(base)}, use_post_norm=post is not False)


class HyperClovaXDecoderLayer(GraniteDecoderLayer):
    def __init__(self, config: HyperClovaXConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.use_post_norm:
            self.post_norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        m, post = self.residual_multiplier, "post_norm1" in self._modules
        a = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        x = x + (self.post_norm1(a) if post else a) * m
        y = self.mlp(self.post_attention_layernorm(x))
        return x + (self.post_norm2(y) if post else y) * m


class HyperClovaXForCausalLM(GraniteForCausalLM):
    _no_split_modules = ["HyperClovaXDecoderLayer"]

    def __init__(self, config: HyperClovaXConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        DecoderForCausalLM.__init__(self, config, GraniteModel(config, HyperClovaXDecoderLayer, norm=norm))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.config.logits_scaling


register_family(ModelFamily(("hyperclovax",), read_hyperclovax, HyperClovaXForCausalLM))
