"""The Llama-family decoder (llama, mistral, qwen2) in one file, written to be split.

Weight names are Hugging Face's, so a checkpoint's keys are this model's state-dict keys.
Everything a pipeline stage may drop is optional: `model.embed_tokens`, any entry of
`model.layers` (a `ModuleDict` keyed "0".."N-1", so keys survive deletions), `model.norm`
and `lm_head` may each be set to None / deleted, and `forward` runs what is left:

    ids -> [embed_tokens] -> layers present, by ascending key -> [norm] -> [lm_head]

The numerics follow transformers' `modeling_llama.py` (RMSNorm in float32, RoPE cos/sin in
float32 then cast, SDPA attention) so logits match it to float32 round-off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import LLAMA_FAMILY_TYPES, LlamaConfig
from .contract import StageModel
from .registry import ModelFamily, register_family

__all__ = [
    "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP",
    "RMSNorm", "RotaryEmbedding", "rope_inv_freq", "attention_mask_bias",
]


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32) for `config`'s RoPE type,
    computed as transformers' `ROPE_INIT_FUNCTIONS` do ("default", "linear", "llama3").

    Example::

        inv_freq = rope_inv_freq(cfg, "cuda:0")
    """
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. `inv_freq` is a non-persistent buffer: it is
    never in a checkpoint, so after materializing from meta call `init_buffers(device)`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # on the CPU even under a meta device context (cheap; meta kernels cost seconds to load)
        self.register_buffer("inv_freq", rope_inv_freq(config, "cpu"), persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute `inv_freq` on `device` (default: where it is now, unless meta)."""
        if device is None:
            device = self.inv_freq.device if not self.inv_freq.is_meta else "cpu"
        self.inv_freq = rope_inv_freq(self.config, device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 whatever x's dtype: bf16 positions * frequencies lose whole radians.
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D] against [B, heads, T, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ----------------------------------------------------------------------------- masks

def attention_mask_bias(
    attention_mask: torch.Tensor | None,
    *,
    q_len: int,
    past: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """The additive attention bias ``[B or 1, 1, q_len, past + q_len]``: 0 where a query
    may look, the dtype's min elsewhere (causal, padding, sliding window), or None when
    plain causal attention from position 0 (SDPA's `is_causal`) says it all.

    Queries are the last `q_len` of ``past + q_len`` cache slots; `attention_mask` is 0/1
    over all those slots. Example::

        bias = attention_mask_bias(torch.tensor([[0, 1, 1]]), q_len=3, past=0,
                                   dtype=torch.float32, device=torch.device("cpu"))
    """
    if attention_mask is None and sliding_window is None and past == 0:
        return None
    kv_len = past + q_len
    q_idx = torch.arange(past, kv_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    # min, not -inf: a padding query that sees nothing gets a uniform softmax, not NaN.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the variance in float32, as every Llama implementation does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE; writes its keys/values to a `KVCache`."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_key = str(layer_idx)  # this layer's key in `model.layers` and the cache
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_sliding_window(layer_idx)
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_key, k, v)
        if self.num_heads != self.num_kv_heads:  # GQA: each kv head serves a group of q heads
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP, each with a residual; the unit a pipeline
    never splits."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- models

class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; each may be absent in a pipeline stage."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent buffers (RoPE) on `device`."""
        self.rotary_emb.init_buffers(device)

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """`x` is input ids ``[B, T]`` if this part has the embedding, else hidden states
        ``[B, T, H]``; returns hidden states ``[B, T, H]`` (normed if it has the norm)."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        layers = sorted(self.layers.items(), key=lambda item: int(item[0]))
        if layers:
            b, t = h.shape[:2]
            past = cache.seq_length(layers[0][0]) if cache is not None else 0
            if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"({b}, {past + t}): one 0/1 entry per cached token plus per new token")
            cos, sin = self.rotary_emb(h, position_ids)
            masks: dict[int | None, torch.Tensor | None] = {}  # one per window, per forward
            for _, layer in layers:
                window = layer.self_attn.sliding_window
                if window not in masks:
                    masks[window] = attention_mask_bias(
                        attention_mask, q_len=t, past=past, dtype=h.dtype, device=h.device,
                        sliding_window=window)
            for _, layer in layers:
                h = layer(h, cos=cos, sin=sin, mask=masks[layer.self_attn.sliding_window],
                          cache=cache)
        if self.norm is not None:
            h = self.norm(h)
        return h


class LlamaForCausalLM(StageModel):
    """A Llama-family causal LM with Hugging Face weight names.

    With `config.tie_word_embeddings`, `lm_head.weight` *is* `model.embed_tokens.weight`
    and, as in Hugging Face checkpoints, `state_dict()` leaves it out; `load_state_dict`
    fills it from ``model.embed_tokens.weight`` (also in a stage that has only the head).

    Example::

        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        del model.model.layers["3"]; model.model.norm = model.lm_head = None  # a first stage
        distload.meta.materialize(model, "cpu")   # allocate, keep ties, init RoPE buffers
        model.load_state_dict(tensors, assign=True)
        hidden = model(ids, position_ids=torch.arange(ids.shape[1])[None])
    """

    _no_split_modules = ["LlamaDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]  # saved by old exports

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
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

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Run the parts present: logits ``[B, T, vocab]`` if this has `lm_head` (``[B,
        vocab]`` of the last position with `last_only`), else hidden states ``[B, T, H]``.
        `position_ids` ``[B, T]`` is required (the caller knows the padding);
        `attention_mask` ``[B, past + T]`` is 1 for real tokens."""
        h = self.model(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache)
        if self.lm_head is None:
            return h
        return self.lm_head(h[:, -1] if last_only else h)


_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _drop_tied_head(module: LlamaForCausalLM, state_dict, prefix: str, local_metadata) -> None:
    embed, head = module.model.embed_tokens, module.lm_head
    if embed is not None and head is not None and head.weight is embed.weight:
        state_dict.pop(prefix + _HEAD, None)


def _fill_tied_head(module: LlamaForCausalLM, state_dict, prefix: str, *args) -> None:
    if not module.config.tie_word_embeddings or module.lm_head is None:
        return
    src, dst = prefix + _EMBED, prefix + _HEAD
    if dst not in state_dict and src in state_dict:
        # A head-only stage takes the embedding's tensor as its own (no unexpected key).
        state_dict[dst] = state_dict[src] if module.model.embed_tokens is not None \
            else state_dict.pop(src)


def _retie_head(module: LlamaForCausalLM, incompatible_keys) -> None:
    module.tie_weights()  # `assign=True` loading replaces Parameters and so unties them


register_family(ModelFamily(LLAMA_FAMILY_TYPES, LlamaConfig.from_dict, LlamaForCausalLM))
