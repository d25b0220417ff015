"""Sparse mixture-of-experts blocks (top-k routing, optional shared expert) with one module
per expert, and the mapping of packed expert tensors onto those modules.

Experts are separate modules, named as the hub's checkpoints name them
(``mlp.experts.3.gate_proj.weight``), so each parameter is one checkpoint tensor. A
checkpoint that packs the experts (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and
``mlp.experts.down_proj`` ``[E, H, I]``, transformers 5's in-memory layout) is mapped onto
them by `unpack_experts`: each expert's matrix is a contiguous byte range inside the
packed tensor, so a rank still reads only its own experts' bytes, and the ranks' bytes
still sum to the checkpoint's.

The numerics follow transformers: router softmax in float32, top-k, optional
renormalization, experts visited in ascending order and summed with `index_add_`.

Example::

    moe = SparseMoE(hidden=64, experts=[GatedMLP(64, 24) for _ in range(4)], top_k=2,
                    norm_topk_prob=True)
    y = moe(x)                       # [B, T, 64]
    moe.active_flops()               # router + 2 experts, per token
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ...checkpoint.types import TensorMeta
from .layers import linear_flops, linear_outputs

__all__ = ["SparseMoE", "unpack_experts"]


class SparseMoE(nn.Module):
    """``gate`` (the router, a bias-free Linear to one logit per expert), ``experts`` (a
    ModuleList) and, optionally, ``shared_expert`` (run on every token) scaled by
    ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).

    `float32_weights` keeps the routing weights in float32 when scaling the experts'
    outputs (Mixtral); otherwise they take the activations' dtype first (Qwen).
    """

    def __init__(self, *, hidden: int, experts: Sequence[nn.Module], top_k: int,
                 norm_topk_prob: bool, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, float32_weights: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and "
                             f"the number of experts ({len(experts)})")
        self.gate = nn.Linear(hidden, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.norm_topk_prob, self.float32_weights = top_k, norm_topk_prob, float32_weights
        if shared_expert is not None:
            self.shared_expert = shared_expert
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(logits.dtype)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():  # ascending, as transformers visits them
            token, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        shared = getattr(self, "shared_expert", None)
        if shared is not None:
            s = shared(flat)
            gate = getattr(self, "shared_expert_gate", None)
            if gate is not None:
                s = torch.sigmoid(gate(flat)) * s
            out = out + s
        return out.view(shape)

    def _always_on(self) -> list[nn.Module]:
        return [m for m in (self.gate, getattr(self, "shared_expert", None),
                            getattr(self, "shared_expert_gate", None)) if m is not None]

    def active_flops(self) -> float:
        """Per-token FLOPs: the router, `top_k` experts (the largest, if they differ) and
        the shared expert with its gate."""
        per_expert = sorted((linear_flops(e) for e in self.experts), reverse=True)
        return sum(linear_flops(m) for m in self._always_on()) + sum(per_expert[:self.top_k])

    def active_activations(self) -> int:
        """Activation elements per token: the router's, `top_k` experts' and the shared
        expert's outputs."""
        per_expert = sorted((linear_outputs(e) for e in self.experts), reverse=True)
        return sum(linear_outputs(m) for m in self._always_on()) + sum(per_expert[:self.top_k])


_PACKED = re.compile(r"^(?P<layer>.+)\.(?P<block>[A-Za-z_]+)\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def unpack_experts(tensors: Mapping[str, TensorMeta], *, block: str,
                   names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                   packed_blocks: tuple[str, ...] = ("mlp",)) -> dict[str, TensorMeta]:
    """`tensors` with every packed expert tensor replaced by one byte range per expert and
    matrix, under the per-expert names ``<layer>.<block>.experts.<e>.<name>.weight``
    (`names`: the gate, up and down matrices' names). Packed tensors are recognised under
    any of `packed_blocks` (``<layer>.mlp.experts.gate_up_proj``); other keys of those
    blocks are moved under `block` (Mixtral's router ``mlp.gate`` → ``block_sparse_moe.gate``).

    ``gate_up_proj`` ``[E, 2I, H]`` holds expert e's gate rows then its up rows;
    ``down_proj`` is ``[E, H, I]``. Raises ValueError naming a tensor of another shape,
    or one without byte ranges (a pickled ``.bin`` file).

    Example::

        unpack_experts(index.tensors, block="mlp")
        # "model.layers.0.mlp.experts.gate_up_proj" -> "model.layers.0.mlp.experts.0.gate_proj.weight", ...
    """
    out: dict[str, TensorMeta] = {}
    for key, meta in tensors.items():
        match = _PACKED.match(key)
        if match is None or match["block"] not in packed_blocks:
            moved = _move_block(key, block, packed_blocks)
            out[moved] = meta if moved == key else replace(meta, name=moved)
            continue
        prefix = f"{match['layer']}.{block}.experts"
        parts = (names[0], names[1]) if match["kind"] == "gate_up_proj" else (names[2],)
        out.update(_expert_slices(meta, prefix, parts))
    return out


def _move_block(key: str, block: str, packed_blocks: tuple[str, ...]) -> str:
    for other in packed_blocks:
        if other != block and f".{other}." in key:
            layer, _, rest = key.partition(f".{other}.")
            if layer.rpartition(".")[2].isdigit():  # <...>.layers.<i>.<other>.<rest>
                return f"{layer}.{block}.{rest}"
    return key


def _expert_slices(meta: TensorMeta, prefix: str, parts: tuple[str, ...]) -> dict[str, TensorMeta]:
    if meta.offset < 0:
        raise ValueError(f"{meta.file}: packed expert tensor {meta.name} is in a pickled checkpoint; "
                         "distload reads packed experts from safetensors files only")
    if len(meta.shape) != 3 or meta.shape[1] % len(parts):
        raise ValueError(f"{meta.file}: packed expert tensor {meta.name} has shape {list(meta.shape)}; "
                         f"expected [experts, {len(parts)} x rows, columns]")
    experts, rows, cols = meta.shape[0], meta.shape[1] // len(parts), meta.shape[2]
    nbytes = rows * cols * meta.torch_dtype.itemsize
    if nbytes * experts * len(parts) != meta.length:
        raise ValueError(f"{meta.file}: packed expert tensor {meta.name} has {meta.length} bytes, "
                         f"not {nbytes * experts * len(parts)} for its shape and dtype")
    out = {}
    for e in range(experts):
        for j, part in enumerate(parts):
            name = f"{prefix}.{e}.{part}.weight"
            out[name] = replace(meta, name=name, shape=(rows, cols),
                                offset=meta.offset + (e * len(parts) + j) * nbytes, length=nbytes)
    return out
