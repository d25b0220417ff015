"""A checkpoint saved from a model's base (GPT-2's ``h.0.attn...``, the hub's original
``gpt2`` files) loaded into the model with its head (``transformer.h.0.attn...``), or the
other way round: transformers' `from_pretrained` matches the names through the class's
``base_model_prefix``; accelerate's `load_checkpoint_and_dispatch` does not (it leaves
every weight on meta and fails later, on the first copy). Here the checkpoint's names
are matched as transformers matches them, before the plan is made.

Example::

    index = with_base_prefix(model, source.index())   # "h.0.ln_1.weight" -> "transformer.h.0.ln_1.weight"
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...checkpoint.index import CheckpointIndex
from ...log import logger

__all__ = ["with_base_prefix"]


def with_base_prefix(model: nn.Module, index: CheckpointIndex) -> CheckpointIndex:
    """`index` with its tensors renamed to `model`'s names where they differ only by the
    model's ``base_model_prefix``: added when the model has that prefix and no checkpoint
    name does (a base model's checkpoint), removed when checkpoint names have it and the
    model's do not (a full model's checkpoint into its base). A name is renamed only
    onto a parameter or buffer the model has; anything else stays as it was."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not isinstance(prefix, str) or not prefix:
        return index
    lead = prefix + "."
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    model_has = any(n.startswith(lead) for n in names)
    checkpoint_has = any(k.startswith(lead) for k in index.tensors)
    if model_has and not checkpoint_has:
        rename = {k: lead + k for k in index.tensors if lead + k in names}
    elif checkpoint_has and not model_has:
        rename = {k: k[len(lead):] for k in index.tensors if k.startswith(lead) and k[len(lead):] in names}
    else:
        return index
    if not rename:
        return index
    logger.info("%d checkpoint tensor names %s the model's base_model_prefix %r, as transformers' "
                "from_pretrained reads them", len(rename), "lack" if model_has else "carry", prefix)
    tensors = {rename.get(k, k): dataclasses.replace(m, name=rename[k]) if k in rename else m
               for k, m in index.tensors.items()}
    return dataclasses.replace(index, tensors=tensors)
