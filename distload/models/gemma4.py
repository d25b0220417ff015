"""Gemma 4's text model (``gemma4_text``), and the text part of Gemma 4 multimodal
checkpoints (``gemma4``), on the shared skeleton.

Like Gemma 3: sandwich norms, √hidden-scaled embeddings, GeGLU MLPs, q/k norms, sliding
layers (5 local to 1 global by default; the last layer is always global) and final-logit
soft-capping (the config reader is `gemma4_config`). What is new:

* **Norms** multiply by their weight as stored (``normed * w``, not ``1 + w``); values get
  a norm without a weight; queries are not scaled (``scale = 1``).
* **Global layers have their own shape**: ``global_head_dim`` (and, with
  `attention_k_eq_v`, ``num_global_key_value_heads``), written by transformers 5.25 as
  `per_layer_config` overrides by layer; their RoPE is "proportional" (a full-width RoPE of
  which only the first ``partial_rotary_factor`` of the frequencies turn). With
  `attention_k_eq_v` a global layer has no ``v_proj``: its values are its keys'
  projection, normed without a weight.
* **Per-layer embeddings** (PLE, the E2B/E4B models): each layer ``i`` adds a gated
  projection of its own input ``(norm(W x0 / √H)[i] + E_ple[ids][i]) / √2``, where
  ``x0`` is the first stage's embedding output and ``E_ple`` a table ``[vocab, layers x
  P]``. *Design:* the first stage computes all layers' inputs ``[B, T, layers, P]`` and
  sends them beside the hidden states (`message_width` = ``H + layers x P``); each later
  stage takes its layers' slices. The other way — every stage receiving token ids and
  reading its own columns of ``E_ple`` — would break the bytes-read invariant's spirit
  twice: a stage's columns are ``vocab`` strided pieces of every row (262 144 small
  reads), and the projection ``W x0`` needs the main embedding's output, which only the
  first stage holds (sending it costs ``H`` per token anyway). So the PLE weights are
  joined to the embedding's stage (`joined_units`) and read by it alone.
* **KV sharing** (`num_kv_shared_layers`): the last layers compute no keys or values;
  each attends to those of the last earlier layer of its type (its *source*, whose cache
  entry it reads: its `layer_key` is the source's). The planner keeps every layer from
  the first source to the last on one stage (`joined_units`), so the source's keys and
  values of this forward are at hand (`shared_kv`, one dict per forward) and its cache is
  this stage's; a sharing layer reserves no KV. Their MLPs are twice as wide with
  `use_double_wide_mlp`.
* **Experts beside the MLP** (`enable_moe_block`, 26B-A4B): the layer's input to the
  feed-forward also goes through a softmax top-k router (weightless norm, ``scale / √H``,
  renormalized, ``per_expert_scale``) to experts packed as transformers stores them
  (``experts.gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``); the two outputs are
  normed and summed. The planner counts the chosen experts' FLOPs only.
* Each layer's output is scaled by its ``layer_scalar``.

    layer: x + post_attention_layernorm(attn(input_layernorm(x)))
           then + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
           then + post_per_layer_input_norm(per_layer_projection(act(gate(x)) * ple_i))
           then * layer_scalar
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention, attend, trim_mask
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .common.rope import RotaryEmbedding
from .gemma4_config import Gemma4Config, read_gemma4, read_gemma4_text
from .registry import ModelFamily, register_family

__all__ = ["Gemma4Config", "Gemma4ForCausalLM", "Gemma4DecoderLayer", "read_gemma4_text"]


class _ScalelessRMSNorm(nn.Module):
    """Gemma 4's RMS norm without a weight (values; float32 statistics)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        return (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x` ``[B, heads, T, D]`` with ``[B, T, D]`` tables (the halves style)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Gemma4Attention(Attention):
    """One layer's attention: q/k norms before RoPE, a weightless norm on values, no
    query scale; a global layer with `k_eq_v` takes its values from ``k_proj``; a
    KV-sharing layer has only ``q_proj`` / ``q_norm`` / ``o_proj`` and attends to its
    source layer's keys and values (its `layer_key` is the source's)."""

    def __init__(self, config: Gemma4Config, i: int) -> None:
        d, eps = config.layer_head_dim(i), config.rms_norm_eps
        source = config.kv_source[i]
        super().__init__(
            hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.layer_kv_heads(i),
            head_dim=d, layer_key=str(i if source is None else source), qkv_bias=config.attention_bias,
            o_bias=config.attention_bias, q_norm=RMSNorm(d, eps, style="olmo"),
            k_norm=RMSNorm(d, eps, style="olmo"), scale=1.0,
            sliding_window=config.layer_sliding_window(i),
            rope_key="rotary_global" if config.is_global(i) else "rotary_emb")
        self.shares_kv, self.stores_kv = source is not None, i in config.kv_sources
        if self.shares_kv:
            del self.k_proj, self.v_proj, self.k_norm
        elif config.k_eq_v and config.is_global(i):
            del self.v_proj
        self.v_norm = _ScalelessRMSNorm(eps)

    def kv_elements_per_token(self) -> int:
        return 0 if self.shares_kv else super().kv_elements_per_token()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None, mask: torch.Tensor | None,
                cache: KVCache | None = None, shared_kv: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope
        q = _rotate(self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2), cos, sin)
        if self.shares_kv:
            k, v = shared_kv[self.layer_key]
        else:
            k = self.k_proj(x).view(b, t, -1, self.head_dim)
            v = self.v_proj(x).view(b, t, -1, self.head_dim) if hasattr(self, "v_proj") else k
            k = _rotate(self.k_norm(k).transpose(1, 2), cos, sin)
            v = self.v_norm(v).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer_key, k, v, keep=self.kv_keep())
            if self.stores_kv and shared_kv is not None:
                shared_kv[self.layer_key] = (k, v)
        if cache is not None:
            mask = trim_mask(mask, k.shape[2])
        out = attend(q, k, v, mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Gemma4Router(nn.Module):
    """Softmax top-k over ``proj`` of the weightless-normed input scaled by ``scale / √H``;
    the chosen weights renormalized, then scaled by ``per_expert_scale``."""

    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        h = config.hidden_size
        self.norm = _ScalelessRMSNorm(config.rms_norm_eps)
        self.proj = nn.Linear(h, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.top_k = config.top_k_experts

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(flat) * self.scale * flat.shape[-1] ** -0.5
        probs = torch.softmax(self.proj(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[chosen], chosen


class Gemma4Experts(nn.Module):
    """The experts packed as transformers stores them: ``gate_up_proj`` ``[E, 2I, H]``
    (gate rows, then up rows), ``down_proj`` ``[E, H, I]``."""

    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act, self.top_k = activation(config.hidden_act), config.top_k_experts

    def forward(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():   # ascending, as transformers visits them
            token, slot = torch.where(chosen == e)
            gate, up = nn.functional.linear(flat[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def active_flops(self) -> float:
        """Per token: the chosen experts' matrices only (the planner's cost)."""
        e, two_i, h = self.gate_up_proj.shape
        return self.top_k * (2.0 * h * two_i + 2.0 * h * two_i // 2)

    def active_activations(self) -> int:
        e, two_i, h = self.gate_up_proj.shape
        return self.top_k * (two_i + h)


class Gemma4DecoderLayer(DecoderLayer):
    def __init__(self, config: Gemma4Config, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.index = i
        self.input_layernorm = RMSNorm(h, eps, style="olmo")
        self.self_attn = Gemma4Attention(config, i)
        self.post_attention_layernorm = RMSNorm(h, eps, style="olmo")
        self.pre_feedforward_layernorm = RMSNorm(h, eps, style="olmo")
        self.post_feedforward_layernorm = RMSNorm(h, eps, style="olmo")
        wide = 2 if config.double_wide_mlp and config.kv_source[i] is not None else 1
        self.mlp = GatedMLP(h, config.intermediate_size * wide, act=config.hidden_act)
        if config.num_experts:   # a dense MLP and experts side by side (26B-A4B)
            self.router = Gemma4Router(config)
            self.experts = Gemma4Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps, style="olmo")
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps, style="olmo")
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps, style="olmo")
        if config.per_layer_size:
            self.per_layer_input_gate = nn.Linear(h, config.per_layer_size, bias=False)
            self.per_layer_projection = nn.Linear(config.per_layer_size, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps, style="olmo")
            self.act = activation(config.hidden_act)
        # a buffer in transformers, saved in the checkpoint: a weight here, so it is read
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.side_width = config.num_hidden_layers * config.per_layer_size

    def activation_elements_per_token(self) -> int:
        """Its Linears' outputs, plus every layer's PLE inputs, which each stage holds beside
        the hidden states while its layers run and sends on (their message copy)."""
        return super().activation_elements_per_token() + 2 * self.side_width

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None, cache: KVCache | None = None,
                per_layer: torch.Tensor | None = None, shared_kv: dict | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, mask, cache, shared_kv))
        y = self.mlp(self.pre_feedforward_layernorm(x))
        if hasattr(self, "experts"):   # the experts read the MLP's input residual, not its output
            flat = x.reshape(-1, x.shape[-1])
            weights, chosen = self.router(flat)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, chosen).reshape(x.shape)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(y)
        if per_layer is not None:
            gate = self.act(self.per_layer_input_gate(x)) * per_layer[:, :, self.index]
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return x * self.layer_scalar


class Gemma4Model(DecoderModel):
    """The skeleton with PLE's three modules right after the embedding (so they are the
    units that follow it, joined to its stage) and the global layers' RoPE table."""

    def __init__(self, config: Gemma4Config) -> None:
        after = {}
        if config.per_layer_size:
            width = config.num_hidden_layers * config.per_layer_size
            after = {"embed_tokens_per_layer": nn.Embedding(config.per_layer_vocab, width),
                     "per_layer_model_projection": nn.Linear(config.hidden_size, width, bias=False),
                     "per_layer_projection_norm": RMSNorm(config.per_layer_size, config.rms_norm_eps,
                                                          style="olmo")}
        rotary = RotaryEmbedding(config.global_rope, head_dim=config.global_head_dim,
                                 max_positions=config.max_position_embeddings)
        super().__init__(config, Gemma4DecoderLayer, norm=RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                                  style="olmo"),
                         extra_rotary={"rotary_global": rotary}, after_embed=after)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        return h * torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype)

    def per_layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Every layer's PLE input ``[B, T, layers, P]`` from the ids and the embedding
        output `h`, as transformers' `get_per_layer_inputs` + `project_per_layer_inputs`."""
        c = self.config
        shape = (*ids.shape, c.num_hidden_layers, c.per_layer_size)
        tokens = self.embed_tokens_per_layer(ids)
        tokens = (tokens * torch.tensor(c.per_layer_size ** 0.5).to(tokens.dtype)).reshape(shape)
        projected = self.per_layer_model_projection(h) * c.hidden_size ** -0.5
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + tokens) * 2.0 ** -0.5

    def begin(self, x: torch.Tensor, position_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        per_layer = None
        if self.embed_tokens is not None:
            h = self.embed(x)
            if c.per_layer_size:
                per_layer = self.per_layer_inputs(x, h)
        elif c.per_layer_size:   # an earlier stage sent them beside the hidden states
            h = x[..., :c.hidden_size]
            per_layer = x[..., c.hidden_size:].unflatten(-1, (c.num_hidden_layers, c.per_layer_size))
        else:
            h = x
        return h, {"per_layer": per_layer, "shared_kv": {}}

    def end(self, h: torch.Tensor, side: dict[str, Any]) -> torch.Tensor:
        per_layer = side["per_layer"]
        return h if per_layer is None else torch.cat((h, per_layer.flatten(-2)), dim=-1)


class Gemma4ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Gemma4DecoderLayer"]

    def __init__(self, config: Gemma4Config) -> None:
        super().__init__(config, Gemma4Model(config))

    @property
    def message_width(self) -> int:
        c = self.config
        return c.hidden_size + c.num_hidden_layers * c.per_layer_size

    def joined_units(self) -> tuple[str, ...]:
        c = self.config
        joined = [f"model.{n}" for n in ("embed_tokens_per_layer", "per_layer_model_projection",
                                         "per_layer_projection_norm") if c.per_layer_size]
        if c.kv_sources:   # from the first source layer to the last layer: one stage
            joined += [f"model.layers.{i}" for i in range(min(c.kv_sources) + 1, c.num_hidden_layers)]
        return tuple(joined)

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        h = self.model(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache)
        if self.lm_head is None:
            return h
        h = h[..., :self.config.hidden_size]   # the PLE inputs sent along end here
        return self.final_logits(self.lm_head(h[:, -1] if last_only else h))

    @classmethod
    def checkpoint_tensors(cls, config: Gemma4Config, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """The text model's tensors, without the keys and values projections a KV-sharing
        layer never runs (some exports keep them; transformers ignores them): no rank
        reads them."""
        tensors = super().checkpoint_tensors(config, tensors)
        shared = "|".join(str(i) for i, s in enumerate(config.kv_source) if s is not None)
        if not shared:
            return tensors
        unused = re.compile(rf"^model\.layers\.({shared})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
        return {k: m for k, m in tensors.items() if not unused.match(k)}


# Fields transformers' Gemma4TextConfig has and the generic checks would misread.
_UNREAD = ("num_experts", "top_k_experts", "moe_intermediate_size")
register_family(ModelFamily(("gemma4_text",), read_gemma4_text, Gemma4ForCausalLM, unread=_UNREAD))
register_family(ModelFamily(("gemma4",), read_gemma4, Gemma4ForCausalLM, nested_text=True))
