"""The skeleton every built-in family fills in: an embedding, string-keyed decoder layers,
a final norm and a head, each of which a pipeline stage may drop, run in order:

    ids -> [embed (+ the family's scale)] -> layers present, by key -> [norm]
        -> [lm_head -> the family's final-logit transforms]

A family subclasses `DecoderLayer` (its residual structure, in a few lines), and, where it
has them, overrides `DecoderModel.embed` (embedding scales) and
`DecoderForCausalLM.final_logits` (soft-capping, logit scales). Because the transforms
live in the stage's `forward`, `last_only=True` (generation) gets them too. A family whose
layers need side inputs (Gemma 4's per-layer embeddings, shared KV) overrides
`DecoderModel.begin` / `end`.

Example::

    class ToyModel(DecoderModel):
        def embed(self, ids):
            return self.embed_tokens(ids) * 2.0

    class ToyForCausalLM(DecoderForCausalLM):
        _no_split_modules = ["ToyDecoderLayer"]

        def __init__(self, config):
            super().__init__(config, ToyModel(config, ToyDecoderLayer, norm=RMSNorm(...)))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...checkpoint.types import TensorMeta
from ...log import logger
from ..cache import KVCache
from ..contract import StageModel
from .attention import Attention, attention_mask_bias, position_ids_from_mask
from .layers import linear_flops, linear_outputs
from .rope import RotaryEmbedding

__all__ = ["DecoderLayer", "PreNormDecoderLayer", "DecoderModel", "DecoderForCausalLM", "nested_text_tensors",
           "drop_extra_layers", "rename_tensors"]


class DecoderLayer(nn.Module):
    """Base of a family's decoder layer (the unit a pipeline never splits): it has a
    `self_attn` (`Attention`) and runs ``layer(h, rope=(cos, sin) or None, mask=...,
    cache=...)``. It tells the planner its per-token FLOPs (mixtures of experts count
    their active experts only) and its KV-cache elements per token."""

    self_attn: Attention

    def flops_per_token(self) -> float:
        return linear_flops(self)

    def kv_elements_per_token(self) -> int:
        return self.self_attn.kv_elements_per_token()

    def kv_tokens_kept(self) -> int | None:
        """Tokens its KV cache holds at most while it runs (a window's W), None: all."""
        keep = getattr(self.self_attn, "kv_keep", lambda: None)()
        return None if keep is None else keep + 1

    def activation_elements_per_token(self) -> int:
        """Elements its Linears output per token (a mixture of experts: the active ones)."""
        return linear_outputs(self)


class PreNormDecoderLayer(DecoderLayer):
    """Llama's layer shape, which most families share: ``x + attn(input_layernorm(x))``,
    then ``+ mlp(post_attention_layernorm(x))``. A family's subclass makes the four
    modules."""

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, decoder layers (``make_layer(config, index)`` each) and final `norm`;
    each may be absent in a pipeline stage. RoPE tables are `rotary_emb` (from
    ``config.rope``) plus any `extra_rotary` a family adds (Gemma 3's local table): a
    layer's ``self_attn.rope_key`` names the attribute it uses, None for no RoPE. `after_embed`
    modules are registered right after the embedding (the units that follow it: Gemma 4's
    per-layer embeddings). A family whose layers need more than the hidden states overrides
    `begin` (what every layer of a forward also gets) and `end` (what the stage sends on)."""

    def __init__(self, config: Any, make_layer: Callable[[Any, int], DecoderLayer], *,
                 norm: nn.Module, interleaved_rope: bool = False,
                 extra_rotary: Mapping[str, RotaryEmbedding] | None = None,
                 after_embed: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        for name, module in (after_embed or {}).items():   # registered here: units in run order
            setattr(self, name, module)
        self.layers = nn.ModuleDict(
            {str(i): make_layer(config, i) for i in range(config.num_hidden_layers)})
        self.norm: nn.Module | None = norm
        self.rotary_emb = RotaryEmbedding(config.rope, head_dim=config.head_dim,
                                          max_positions=config.max_position_embeddings,
                                          interleaved=interleaved_rope)
        for name, table in (extra_rotary or {}).items():
            setattr(self, name, table)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → the first hidden states (families with an embedding scale override)."""
        return self.embed_tokens(ids)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent buffers (RoPE) on `device`."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.init_buffers(device)

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """`x` is input ids ``[B, T]`` if this part has the embedding, else hidden states
        ``[B, T, H]``; returns hidden states ``[B, T, H]`` (normed if it has the norm).
        Without `position_ids`, positions count the real tokens of `attention_mask` (as
        `generate` does: left padding starts at 0), else run on from the cache's length."""
        layers = [layer for _, layer in sorted(self.layers.items(), key=lambda kv: int(kv[0]))]
        b, t = x.shape[:2]
        past = cache.seq_length(layers[0].self_attn.layer_key) if cache is not None and layers else 0
        if layers and attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                f"({b}, {past + t}): one 0/1 entry per cached token plus per new token")
        if position_ids is None and (layers or self.embed_tokens is not None):
            position_ids = _default_positions(attention_mask, b, t, past, x.device)
        h, side = self.begin(x, position_ids)
        if layers:
            ropes, masks = {}, {}  # one table per RoPE and one mask per window/chunk, per forward
            for layer in layers:
                attn = layer.self_attn
                if attn.rope_key is not None and attn.rope_key not in ropes:
                    ropes[attn.rope_key] = getattr(self, attn.rope_key)(h, position_ids)
                if _mask_key(attn) not in masks:
                    masks[_mask_key(attn)] = self.attention_bias(attention_mask_bias(
                        attention_mask, q_len=t, past=past, dtype=h.dtype, device=h.device,
                        sliding_window=attn.sliding_window,
                        chunk_size=getattr(attn, "attention_chunk", None)),
                        attention_mask, q_len=t, past=past, dtype=h.dtype, device=h.device)
            for layer in layers:
                attn = layer.self_attn
                h = layer(h, rope=ropes.get(attn.rope_key), mask=masks[_mask_key(attn)],
                          cache=cache, **side)
        if self.norm is not None:
            h = self.norm(h)
        return self.end(h, side)

    def begin(self, x: torch.Tensor, position_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        """This stage's input → (hidden states ``[B, T, H]``, keyword arguments every layer
        of this forward gets besides). Default: the embedding of ids where this part has
        it, else `x` itself, and no side inputs. `position_ids` ``[B, T]`` are there for
        families that embed positions (GPT-2's learned table)."""
        return (self.embed(x) if self.embed_tokens is not None else x), {}

    def attention_bias(self, bias: torch.Tensor | None, attention_mask: torch.Tensor | None, *,
                       q_len: int, past: int, dtype: torch.dtype, device: torch.device
                       ) -> torch.Tensor | None:
        """The additive bias every layer's attention gets, from the causal and padding
        `bias` (None: plain causal); a family that biases positions adds its own (BLOOM's
        ALiBi). Default: `bias` itself."""
        return bias

    def end(self, h: torch.Tensor, side: dict[str, Any]) -> torch.Tensor:
        """What this part returns after its layers and norm (a family that sends side
        inputs to the next stage packs them here). Default: the hidden states."""
        return h


class DecoderForCausalLM(StageModel):
    """A causal LM of the stage contract with Hugging Face weight names: ``model`` (a
    `DecoderModel`) and ``lm_head``.

    With ``config.tie_word_embeddings``, `lm_head.weight` *is* `model.embed_tokens.weight`
    and, as in Hugging Face checkpoints, `state_dict()` leaves it out; `load_state_dict`
    fills it from ``model.embed_tokens.weight`` (also in a stage that has only the head).
    """

    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]  # saved by old exports

    def __init__(self, config: Any, model: DecoderModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head: nn.Linear | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.register_load_state_dict_post_hook(_retie_head)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent buffers (RoPE) on `device`; call after
        materializing from meta."""
        self.model.init_buffers(device)

    def tie_weights(self) -> None:
        """Make `lm_head.weight` the embedding's Parameter again, where both are present
        and the config ties them (after anything that re-created either)."""
        if self.config.tie_word_embeddings and self.lm_head is not None \
                and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's transforms of the head's output (none by default)."""
        return logits

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Run the parts present: logits ``[B, T, vocab]`` if this has `lm_head` (``[B,
        vocab]`` of the last position with `last_only`), else hidden states ``[B, T, H]``.
        `position_ids` ``[B, T]`` (default: from `attention_mask`, else counting on from
        the cache; see `DecoderModel.forward`); `attention_mask` ``[B, past + T]`` is 1
        for real tokens."""
        h = self.model(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache)
        if self.lm_head is None:
            return h
        return self.final_logits(self.lm_head(h[:, -1] if last_only else h))

    @classmethod
    def checkpoint_tensors(cls, config: Any, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """The text part of a nested checkpoint under this model's names (see
        `nested_text_tensors`); otherwise the names already match."""
        if getattr(config, "nested_in", None):
            return nested_text_tensors(tensors, outer=config.nested_in)
        return tensors


def _mask_key(attn) -> tuple[int | None, int | None]:
    return attn.sliding_window, getattr(attn, "attention_chunk", None)


def _default_positions(attention_mask: torch.Tensor | None, batch: int, length: int, past: int,
                       device: torch.device) -> torch.Tensor:
    """RoPE positions when the caller gave none: the running count of real tokens minus
    one (padding at 0), or `past` onwards without a mask."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, length)
    return position_ids_from_mask(attention_mask, length).to(device)


# Where multimodal checkpoints keep their text model: transformers 4.50's layout (what
# 5.x's save_pretrained writes, and the hub holds) and 4.52+'s in-memory names.
# A text-only export under the outer config keeps its plain names (Gemma 4's per-layer
# embedding modules among them).
_TEXT_PREFIXES = ((re.compile(r"^language_model\.model\."), "model."),
                  (re.compile(r"^model\.language_model\."), "model."),
                  (re.compile(r"^language_model\.lm_head\."), "lm_head."),
                  (re.compile(r"^lm_head\."), "lm_head."),
                  (re.compile(r"^model\.(?=(layers|embed_tokens|norm|embed_tokens_per_layer|per_layer_model_projection"
                              r"|per_layer_projection_norm)\.)"), "model."))


def nested_text_tensors(tensors: Mapping[str, TensorMeta], *, outer: str) -> dict[str, TensorMeta]:
    """The tensors of the text model nested in a multimodal checkpoint (`outer` model
    type), renamed to a plain causal LM's names (``language_model.model.layers.0...`` →
    ``model.layers.0...``); the other parts (vision tower, projector) are left out, so no
    rank reads them. ValueError when no tensor is under a text prefix.

    Example::

        nested_text_tensors({"language_model.model.norm.weight": m}, outer="gemma3")
        # {"model.norm.weight": m (renamed)}
    """
    out: dict[str, TensorMeta] = {}
    dropped = 0
    for name, meta in tensors.items():
        for pattern, repl in _TEXT_PREFIXES:
            new, hits = pattern.subn(repl, name)
            if hits:
                out[new] = replace(meta, name=new)
                break
        else:
            dropped += meta.length
    if not any(n.startswith("model.") for n in out):
        raise ValueError(f"the {outer} checkpoint has no text-model tensors (expected names "
                         "under language_model.model. or model.language_model.)")
    logger.info("loading the text model of a %s checkpoint; %.1f MB of other parts "
                "(vision tower, projector) are not read", outer, dropped / 1e6)
    return out


def _drop_tied_head(module: DecoderForCausalLM, state_dict, prefix: str, local_metadata) -> None:
    embed, head = module.model.embed_tokens, module.lm_head
    if embed is not None and head is not None and head.weight is embed.weight:
        state_dict.pop(prefix + _HEAD, None)


def _fill_tied_head(module: DecoderForCausalLM, state_dict, prefix: str, *args) -> None:
    if not module.config.tie_word_embeddings or module.lm_head is None:
        return
    src, dst = prefix + _EMBED, prefix + _HEAD
    if dst not in state_dict and src in state_dict:
        # A head-only stage takes the embedding's tensor as its own (no unexpected key).
        state_dict[dst] = state_dict[src] if module.model.embed_tokens is not None \
            else state_dict.pop(src)


def _retie_head(module: DecoderForCausalLM, incompatible_keys) -> None:
    module.tie_weights()  # `assign=True` loading replaces Parameters and so unties them


_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def drop_extra_layers(tensors: Mapping[str, TensorMeta], layers: int) -> dict[str, TensorMeta]:
    """`tensors` without those of layers numbered `layers` and up: the multi-token-prediction
    layers GLM-4.5 and DeepSeek-V3 checkpoints append after the decoder's own
    (``model.layers.<num_hidden_layers>.``), which a causal LM never runs. No rank reads them.

    Example::

        drop_extra_layers({"model.layers.46.eh_proj.weight": m, "model.norm.weight": n}, 46)
        # {"model.norm.weight": n}
    """
    out, dropped = {}, 0
    for name, meta in tensors.items():
        match = _LAYER_KEY.match(name)
        if match is not None and int(match[1]) >= layers:
            dropped += meta.length
        else:
            out[name] = meta
    if dropped:
        logger.info("%.1f MB of multi-token-prediction layers (model.layers.%d and up) are not read",
                    dropped / 1e6, layers)
    return out


def rename_tensors(tensors: Mapping[str, TensorMeta], rules: tuple[tuple[str, str], ...]
                   ) -> dict[str, TensorMeta]:
    """`tensors` under this model's names: each name takes the first regex of `rules` that
    matches (``re.sub(pattern, repl, name)``); the byte ranges stay those of the file. For
    families whose checkpoints name the shared parts otherwise (GPT-NeoX's ``gpt_neox.embed_in``
    is ``model.embed_tokens``).

    Example::

        rename_tensors(tensors, ((r"^gpt_neox\\.embed_in\\.", "model.embed_tokens."),))
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for name, meta in tensors.items():
        new = name
        for pattern, repl in compiled:
            new, hits = pattern.subn(repl, name)
            if hits:
                break
        out[new] = meta if new == name else replace(meta, name=new)
    return out
