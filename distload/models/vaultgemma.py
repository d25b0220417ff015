"""VaultGemma: Gemma 2 (config, attention with its query scale, soft-caps and sliding
layers, scaled embeddings, final-logit soft-cap) with Gemma 1's two norms per layer:
``input_layernorm`` before attention and ``pre_feedforward_layernorm`` before the MLP,
none after either."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .cache import KVCache
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import RMSNorm
from .gemma import GemmaConfig, GemmaDecoderLayer, GemmaForCausalLM, GemmaModel, read_gemma
from .registry import ModelFamily, register_family

__all__ = ["VaultGemmaConfig", "VaultGemmaForCausalLM", "VaultGemmaDecoderLayer", "read_vaultgemma"]


@dataclass(frozen=True, kw_only=True)
class VaultGemmaConfig(GemmaConfig):
    """A VaultGemma decoder: Gemma 2's fields and defaults. Example::

        cfg = read_vaultgemma(json.load(open("vaultgemma-1b/config.json")))
    """

    @property
    def generation(self) -> int:
        return 2


def read_vaultgemma(d: dict[str, Any]) -> VaultGemmaConfig:
    """The `VaultGemmaConfig` of a config.json dict (read as Gemma 2's); ValueError naming
    an unsupported field."""
    cfg = read_gemma({**d, "model_type": "gemma2"})
    return VaultGemmaConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)} | {"model_type": "vaultgemma"})


class VaultGemmaDecoderLayer(GemmaDecoderLayer):
    def __init__(self, config: VaultGemmaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.post_attention_layernorm
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="gemma")

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.pre_feedforward_layernorm(x))


class VaultGemmaModel(GemmaModel):
    """Gemma's scaled embedding over VaultGemma's layers."""

    def __init__(self, config: VaultGemmaConfig) -> None:
        DecoderModel.__init__(self, config, VaultGemmaDecoderLayer,
                              norm=RMSNorm(config.hidden_size, config.rms_norm_eps, style="gemma"))


class VaultGemmaForCausalLM(GemmaForCausalLM):
    _no_split_modules = ["VaultGemmaDecoderLayer"]

    def __init__(self, config: VaultGemmaConfig) -> None:
        DecoderForCausalLM.__init__(self, config, VaultGemmaModel(config))


register_family(ModelFamily(("vaultgemma",), read_vaultgemma, VaultGemmaForCausalLM))
