"""Which tensors of a model stay float32 when a device-map load casts to a half dtype.

Two rules, each from its owner:

* accelerate's ``keep_in_fp32_modules`` argument (`load_checkpoint_in_model`): under
  float16 only, a tensor whose name holds one of those names followed by a dot, or is
  one (accelerate's own test);
* the model class's own declaration, as transformers' ``from_pretrained(dtype=...)``
  reads it (``PreTrainedModel._get_dtype_plan``): ``_keep_in_fp32_modules`` under
  float16, ``_keep_in_fp32_modules_strict`` under float16 and bfloat16 — patterns (``*``
  any characters) searched in each parameter's and persistent buffer's name. DeepSeek-V3
  and GLM-4.5 keep their routers so (``["e_score_correction_bias", "gate.weight"]``):
  their correction biases rounded to bfloat16 choose other experts. accelerate's own
  ``load_checkpoint_and_dispatch`` casts everything to `dtype`; distload keeps what the
  model declares, as transformers does (the pipeline path does the same with
  `distload.models.ModelFamily.keep_float32`).

Example::

    keep = float32_rule(model, "bfloat16")
    keep("model.layers.1.mlp.gate.weight")      # True for a DeepSeek-V3 model
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["float32_rule", "declared_float32", "float32_dtypes"]


def declared_float32(model: nn.Module, dtype: str | None) -> tuple[str, ...]:
    """The patterns `model` (and any transformers model inside it) declares float32 under
    `dtype` (a name; None: no cast, nothing kept), in declaration order."""
    attrs = {"float16": ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"),
             "bfloat16": ("_keep_in_fp32_modules_strict",)}.get(dtype or "", ())
    out: list[str] = []
    for module in model.modules():   # transformers merges a sub-model's into its parent's too
        for attr in attrs:
            names = getattr(module, attr, None)
            if isinstance(names, (list, tuple, set, frozenset)):
                out.extend(n for n in sorted(names) if isinstance(n, str) and n not in out)
    return tuple(out)


def float32_rule(model: nn.Module, dtype: str | None, modules: Sequence[str] = ()) -> Callable[[str], bool]:
    """Whether the tensor of a given name stays float32 when the load casts floating
    tensors to `dtype` (a name): the model's declaration, or one of accelerate's
    `modules` under float16 (see the module doc)."""
    declared = declared_float32(model, dtype)
    pattern = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in declared)) if declared else None
    given = tuple(modules) if dtype == "float16" else ()

    def keep(name: str) -> bool:
        if pattern is not None and pattern.search(name):
            return True
        return any((m in name and f"{m}." in name) or m == name for m in given)

    return keep


def float32_dtypes(model: nn.Module, dtype: str | None) -> dict[str, torch.dtype]:
    """``{name: torch.float32}`` for every parameter and buffer of `model` that stays
    float32 under `dtype` (the model's declaration): the `special_dtypes` a device map
    planned for that `dtype` must size them with."""
    keep = float32_rule(model, dtype)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {n: torch.float32 for n in names if keep(n)}
