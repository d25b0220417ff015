"""Granite MoE (3.0 MoE; and ``granitemoeshared``, with an always-on shared MLP): Granite's
decoder and multipliers (`granite.py`) with a mixture of experts,
``block_sparse_moe``: the router takes the top-k logits and softmaxes them; experts
are gated SiLU MLPs.

Checkpoints keep the experts packed, ``block_sparse_moe.input_linear.weight`` ``[E, 2I, H]``
(each expert's gate rows, then up rows) and ``output_linear.weight`` ``[E, H, I]``; each
expert is a byte range of those (`unpack_experts`), so a rank reads only its own layers'.
The router is ``block_sparse_moe.router.layer``; the shared MLP's ``input_linear`` is
fused gate-then-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .common.config import positive_int
from .common.decoder import DecoderForCausalLM, rename_tensors
from .common.layers import FusedGatedMLP, GatedMLP, RMSNorm, linear_flops, linear_outputs
from .common.moe import unpack_experts
from .common.routing import run_experts
from .granite import GraniteConfig, GraniteDecoderLayer, GraniteForCausalLM, GraniteModel, read_granite
from .registry import ModelFamily, register_family

__all__ = ["GraniteMoeConfig", "GraniteMoeForCausalLM", "GraniteMoeDecoderLayer", "read_granitemoe"]

# the hub's names (and transformers' in-memory ones) onto the per-expert layout `unpack_experts` reads
_NAMES = ((r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
          (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
          (r"\.block_sparse_moe\.router\.weight$", ".block_sparse_moe.router.layer.weight"),
          (r"\.shared_mlp\.input_linear\.", ".shared_mlp.gate_up_proj."),
          (r"\.shared_mlp\.output_linear\.", ".shared_mlp.down_proj."))


@dataclass(frozen=True, kw_only=True)
class GraniteMoeConfig(GraniteConfig):
    """A Granite MoE decoder (`shared_intermediate_size` 0: no shared MLP). Example::

        cfg = read_granitemoe(json.load(open("granite-3.1-3b-a800m-instruct/config.json")))
        cfg.num_local_experts, cfg.num_experts_per_tok       # 40, 8
    """

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 0


def read_granitemoe(d: dict[str, Any]) -> GraniteMoeConfig:
    """The `GraniteMoeConfig` of a granitemoe or granitemoeshared config.json dict;
    ValueError naming an unsupported field."""
    base = read_granite(d)
    experts = positive_int(d, "num_local_experts", 8)
    top_k = positive_int(d, "num_experts_per_tok", 2)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")
    shared = 0
    if d.get("model_type") == "granitemoeshared" and d.get("shared_intermediate_size"):
        shared = positive_int(d, "shared_intermediate_size")
    return GraniteMoeConfig(**{f.name: getattr(base, f.name) for f in fields(base)}, num_local_experts=experts,
                            num_experts_per_tok=top_k, shared_intermediate_size=shared)


class _Router(nn.Module):
    """``layer`` (``[E, H]``): top-k of the logits (float32), softmaxed, in the activations' dtype."""

    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden, experts, bias=False)
        self.top_k = top_k

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, chosen = self.layer(flat).float().topk(self.top_k, dim=-1)
        return torch.softmax(logits, dim=-1).type_as(flat), chosen


class GraniteMoe(nn.Module):
    def __init__(self, config: GraniteMoeConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.router = _Router(h, config.num_local_experts, config.num_experts_per_tok)
        self.experts = nn.ModuleList(GatedMLP(h, config.intermediate_size, act=config.hidden_act)
                                     for _ in range(config.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(flat)
        return run_experts(flat, self.experts, weights, chosen).view(x.shape)

    def active_flops(self) -> float:
        return linear_flops(self.router) + self.router.top_k * linear_flops(self.experts[0])

    def active_activations(self) -> int:
        return linear_outputs(self.router) + self.router.top_k * linear_outputs(self.experts[0])


class GraniteMoeDecoderLayer(GraniteDecoderLayer):
    """Granite's layer with experts (and, for granitemoeshared, a shared MLP) for its MLP."""

    def _add_mlp(self, config: GraniteMoeConfig) -> None:
        self.block_sparse_moe = GraniteMoe(config)
        if config.shared_intermediate_size:
            self.shared_mlp = FusedGatedMLP(config.hidden_size, config.shared_intermediate_size,
                                            act=config.hidden_act)

    def _mlp(self, normed: torch.Tensor) -> torch.Tensor:
        out = self.block_sparse_moe(normed)
        shared = getattr(self, "shared_mlp", None)
        return out if shared is None else out + shared(normed)


class GraniteMoeForCausalLM(GraniteForCausalLM):
    """Granite's embedding and logit multipliers over Granite MoE layers."""

    _no_split_modules = ["GraniteMoeDecoderLayer"]

    def __init__(self, config: GraniteMoeConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        DecoderForCausalLM.__init__(self, config, GraniteModel(config, GraniteMoeDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: GraniteMoeConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Each expert a byte range of the packed tensors; the router and shared MLP renamed."""
        return unpack_experts(rename_tensors(tensors, _NAMES), block="block_sparse_moe",
                              packed_blocks=("block_sparse_moe",))


register_family(ModelFamily(("granitemoe", "granitemoeshared"), read_granitemoe, GraniteMoeForCausalLM))
