"""Describe a (meta) model as plain data the planner can use: its units, their
parameters and per-token cost, and its tied parameters.

A *unit* is the smallest piece the planner never splits across ranks or tiers: each
repeated child of a `ModuleList`/`ModuleDict` (decoder layers), any module whose class is
named in `no_split_module_classes` (or the model's `_no_split_modules`), and any other
module that holds parameters of its own (embeddings, final norm, head).

A unit's cost is its per-token FLOPs: ``2 * in * out`` for every `nn.Linear` in it, unless
the unit module says otherwise with ``flops_per_token()`` (a mixture of experts runs only
its active experts; its bytes still count them all). Its KV cache per token is the output
width of its ``k_proj`` and ``v_proj``, unless it defines ``kv_elements_per_token()``; its
activations per token are its Linears' outputs, unless it defines
``activation_elements_per_token()`` (again: only the active experts run). A unit with a
fixed-size recurrent state (linear attention) says its float32 elements per sequence with
``state_elements_per_sequence()``; one whose cache keeps only a window of tokens says how
many with ``kv_tokens_kept()``. A model whose ``joined_units()`` names units keeps each on
the stage of the unit before it (`ModelSpec.joined`: the planner puts no boundary there).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint.dtypes import dtype_name
from .sizes import find_tied_parameters

__all__ = ["ParamSpec", "UnitSpec", "ModelSpec", "describe_model"]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str | None = None   # the model's dtype name for it (None: unknown)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class UnitSpec:
    name: str
    params: tuple[ParamSpec, ...]
    cost: float  # per-token FLOPs: 2 * in * out for every Linear; embeddings cost ~0
    kind: str = ""           # the unit module's class name, e.g. "LlamaDecoderLayer"
    kv_per_token: int = 0    # KV-cache elements kept per token (k_proj + v_proj outputs)
    act_per_token: int = 0   # activation elements per token: its input plus every output
    max_out: int = 0         # the widest Linear/Embedding output (logits: the vocabulary)
    in_width: int = 0        # its widest Linear input (the hidden size a head reads)
    state_per_sequence: int = 0  # float32 elements of a fixed recurrent state per sequence
    kv_tokens: int = 0       # tokens its KV cache holds at most (a window); 0: all


@dataclass(frozen=True)
class ModelSpec:
    units: tuple[UnitSpec, ...]          # in execution (registration) order
    tied: tuple[tuple[str, ...], ...]    # groups of parameter names sharing one tensor
    no_split_classes: tuple[str, ...]    # class names that were treated as units
    ignored_keys: tuple[str, ...] = ()   # regexes of checkpoint keys that fill no parameter
    head: str = ""                       # the unit making the logits (output embedding), if known
    joined: tuple[str, ...] = ()         # units kept on the stage of the unit before them

    def unit_of(self) -> dict[str, str]:
        return {p.name: u.name for u in self.units for p in u.params}


def describe_model(model: nn.Module, *, no_split_module_classes=None) -> ModelSpec:
    """Walk `model` (typically on meta) and return its units in registration order.

    Example::

        with init_empty_weights():
            model = build_model(config)
        spec = describe_model(model)
        [u.name for u in spec.units][:2]   # ['model.embed_tokens', 'model.layers.0']
    """
    if no_split_module_classes is None:
        no_split_module_classes = getattr(model, "_no_split_modules", None) or ()
    no_split = tuple(sorted(set(no_split_module_classes)))
    units: list[UnitSpec] = []
    _collect(model, "", set(no_split), units)
    tied = tuple(tuple(group) for group in find_tied_parameters(model))
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return ModelSpec(units=tuple(units), tied=tied, no_split_classes=no_split, ignored_keys=ignored,
                     head=_head_unit(model, units), joined=_joined(model, units))


def _joined(model: nn.Module, units: list[UnitSpec]) -> tuple[str, ...]:
    """The units the model keeps on the stage of the unit before them (the stage
    contract's ``joined_units()``), in execution order. A name that is no unit here (a
    coarser unit holds it, whole) or is the first unit constrains nothing and is left out."""
    hook = getattr(model, "joined_units", None)
    joined = set(hook()) if callable(hook) else set()
    return tuple(u.name for u in units[1:] if u.name in joined)


def _head_unit(model: nn.Module, units: list[UnitSpec]) -> str:
    """The unit holding the output embedding (the model's ``get_output_embeddings()``, as
    transformers' and distload's models have it), "" when there is none: the model says
    which module is its head, no name is guessed here."""
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        head = None
    if not isinstance(head, nn.Module):
        return ""
    names = {u.name for u in units}
    return next((name for name, mod in model.named_modules() if mod is head and name in names), "")


def _collect(module: nn.Module, prefix: str, no_split: set[str], out: list[UnitSpec]) -> None:
    if prefix and (type(module).__name__ in no_split or _has_own_params(module)):
        out.append(_unit(module, prefix))
        return
    children = list(module.named_children())
    repeated = isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(
        {type(c) for _, c in children}) == 1
    for name, child in children:
        child_prefix = f"{prefix}.{name}" if prefix else name
        if repeated and any(True for _ in child.parameters()):
            out.append(_unit(child, child_prefix))
        else:
            _collect(child, child_prefix, no_split, out)


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _unit(module: nn.Module, prefix: str) -> UnitSpec:
    params = tuple(
        ParamSpec(f"{prefix}.{n}", tuple(p.shape), dtype_name(p.dtype))
        for n, p in module.named_parameters(remove_duplicate=False)
    )
    cost, kv, act, widest, width_in = 0.0, 0, 0, 0, 0
    for sub_name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) or _stored_transposed(sub):
            cost += 2.0 * sub.in_features * sub.out_features
            act += sub.out_features
            widest, width_in = max(widest, sub.out_features), max(width_in, sub.in_features)
            if sub_name.rpartition(".")[2] in _KV_PROJECTIONS:
                kv += sub.out_features
        elif isinstance(sub, nn.Embedding):
            act += sub.embedding_dim
            widest = max(widest, sub.embedding_dim)
    flops = getattr(module, "flops_per_token", None)
    if callable(flops):
        cost = float(flops())
    kv_hook = getattr(module, "kv_elements_per_token", None)  # fused qkv, shared KV layers
    if callable(kv_hook):
        kv = int(kv_hook())
    act_hook = getattr(module, "activation_elements_per_token", None)  # experts: active ones
    if callable(act_hook):
        act = int(act_hook())
    state_hook = getattr(module, "state_elements_per_sequence", None)  # linear attention
    state = int(state_hook()) if callable(state_hook) else 0
    kept_hook = getattr(module, "kv_tokens_kept", None)  # sliding windows, chunks
    kept = (kept_hook() or 0) if callable(kept_hook) else 0
    return UnitSpec(name=prefix, params=params, cost=cost, kind=type(module).__name__,
                    kv_per_token=kv, act_per_token=act + width_in, max_out=widest, in_width=width_in,
                    state_per_sequence=state, kv_tokens=int(kept))


def _stored_transposed(module: nn.Module) -> bool:
    """A linear layer whose weight is stored ``[in, out]`` (GPT-2's Conv1D): it says its
    `in_features` and `out_features` as `nn.Linear` does."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and \
        tuple(weight.shape) == (getattr(module, "in_features", None), getattr(module, "out_features", None))


# Linear submodules whose outputs a KV cache keeps (Llama/Mistral/Qwen2 and most HF decoders).
_KV_PROJECTIONS = ("k_proj", "v_proj")
