"""The stage contract: what a model must do to be split into pipeline stages, planned and
loaded by distload. The pipeline, the planner and the loader use nothing else of a model.

A model of this contract is a decoder-only causal LM with Hugging Face weight names, built
on the meta device from its config, then cut into stages:

* **Parts.** An optional input embedding, string-keyed layers in a `nn.ModuleDict` (keys
  ``"0"``..``"N-1"``, so names stay those of the checkpoint when a stage keeps some), an
  optional final norm and an optional head. A stage keeps a contiguous run of the model's
  *units* (see `distload.meta.describe_model`); a unit it does not keep is deleted from its
  `ModuleDict` or set to `None`, and the model must run with whatever is left.
* **Running a stage.** ``stage(x, position_ids=..., attention_mask=None, cache=None,
  last_only=False)``: `x` is token ids ``[B, T]`` where the stage has the embedding, else
  hidden states ``[B, T, H]``; the stage applies the parts it has in order (embedding and
  any embedding scale; its layers; the final norm; the head with every final-logit
  transform — softcaps, logit scales — so no caller can skip one) and returns hidden
  states ``[B, T, H]``, or logits ``[B, T, V]`` on the stage with the head (only the last
  position's, ``[B, V]``, when `last_only`: generation needs nothing else). The pipeline
  always gives the positions (it knows the padding); the built-in models derive them when
  none are given (``model(ids)`` in one process, as with a transformers model: from the
  mask, else from the cache's length). `attention_mask` ``[B, past + T]`` is 1 for real
  tokens; `cache` is the stage's `KVCache` for one group of sequences.
* **Facts for the pipeline.** `message_width` (``config.hidden_size`` unless a family
  sends more) and ``config.vocab_size`` size the messages between stages; `has_embedding`
  / `has_head` say what the stage holds. A family whose layers need more than the hidden
  states — inputs only the first stage can compute (Gemma 4's per-layer embeddings) —
  sends them beside the hidden states, ``[B, T, message_width]``: every stage without the
  head returns that width, the one with the head reads it. `max_positions` is the length
  of a learned position table (GPT-2, OPT; None for RoPE and ALiBi): a call needing more
  positions is refused on rank 0 before it starts.
* **Facts for the planner and loader** (class attributes, read on the meta model):
  `_no_split_modules` (class names never split), `_keys_to_ignore_on_load_unexpected`
  (regexes of checkpoint keys that are not parameters, e.g. saved RoPE frequencies),
  `input_embedding_name` (the parameter whose dtype the activations take),
  `output_embedding_name` (the head module, `get_output_embeddings()`), `is_norm_scale`
  (which parameters scale a normalization), and
  `checkpoint_tensors` (maps the checkpoint's tensors onto parameter names, for
  checkpoints whose names differ from the model's: nested text models, packed experts).
  A unit module may define ``flops_per_token()`` and ``activation_elements_per_token()``
  when counting its `nn.Linear`s (and linear layers stored ``[in, out]`` that say their
  `in_features` and `out_features`: GPT-2's `Conv1D`) would be wrong (mixture-of-experts: only the active
  experts run), and ``kv_elements_per_token()`` (fused qkv projections), ``kv_tokens_kept()``
  (a window or chunk: the tokens its cache holds at most) and
  ``state_elements_per_sequence()`` (linear attention: a fixed float32 state instead of KV).
  `joined_units()` names the units the planner must keep on the stage of the unit before
  them (a layer reading another layer's KV; parts the embedding's stage must hold).
* **Buffers.** Non-persistent buffers (RoPE frequencies) are recomputed by
  ``init_buffers(device)`` after a stage is materialized from meta.

Example::

    with init_empty_weights():
        model = build_model(config_dict)          # any registered model_type
    del model.model.layers["3"]; model.lm_head = None     # keep what this stage runs
    hidden = model(ids, position_ids=pos)                  # [B, T, H]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache

__all__ = ["StageModel"]


class StageModel(nn.Module):
    """Base class of the built-in models: the contract above, with the parts every family
    shares. A family implements `forward` (and usually `init_buffers`)."""

    config: Any
    _no_split_modules: list[str] = []
    _keys_to_ignore_on_load_unexpected: list[str] = []
    input_embedding_name: str = "model.embed_tokens.weight"
    output_embedding_name: str = "lm_head"   # the head: the module that makes the logits

    @property
    def has_embedding(self) -> bool:
        module: Any = self
        for part in self.input_embedding_name.split(".")[:-1]:  # the embedding module's path
            module = getattr(module, part, None)
            if module is None:
                return False
        return True

    def get_output_embeddings(self) -> nn.Module | None:
        """The head module (`output_embedding_name`; transformers' name for this getter), None
        on a stage without it."""
        module: Any = self
        for part in self.output_embedding_name.split("."):
            module = getattr(module, part, None)
            if module is None:
                return None
        return module

    @property
    def has_head(self) -> bool:
        return self.get_output_embeddings() is not None

    @classmethod
    def is_norm_scale(cls, name: str) -> bool:
        """Whether parameter `name` is a normalization's scale (one leaves its input as is,
        zero erases it): checkpoints of random weights (`distload.sources.make_checkpoint`)
        draw these near one. A family naming its norms otherwise overrides it."""
        return name.endswith("norm.weight")

    @property
    def message_width(self) -> int:
        """Width of the activations one stage sends the next (the same on every stage)."""
        return int(self.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        """Positions a call may use at most (a learned position table's length); None: no
        such limit. Default: None."""
        return None

    def joined_units(self) -> tuple[str, ...]:
        """Names of the units (as `distload.meta.describe_model` names them) that must stay
        on the same stage as the unit before them; no stage boundary falls before one.
        Read on the meta model before planning. Default: none."""
        return ()

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers on `device` (none by default)."""

    def new_cache(self) -> KVCache:
        """An empty KV cache for one group of sequences on this stage."""
        return KVCache()

    @classmethod
    def checkpoint_tensors(cls, config: Any, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """The checkpoint's tensors under the names of this model's parameters. Rank 0
        calls it before planning; a returned `TensorMeta` may be a byte range *inside* a
        stored tensor (one expert of a packed tensor), so each rank still reads only its
        own bytes. Default: the names already match."""
        return tensors
