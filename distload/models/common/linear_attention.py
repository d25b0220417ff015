"""Gated DeltaNet linear attention (Qwen3-Next's, Qwen3.5's): a short causal convolution
over the q/k/v projections, then the gated delta rule — a fixed-size state per head
``S [Dk, Dv]`` that decays by ``exp(g_t)`` and is corrected towards ``v_t`` along
``k_t`` with strength ``beta_t`` — read out by the queries, RMS-normed and gated by
``silu(z)``. Instead of a growing KV cache each layer keeps a fixed state in the
`KVCache` (`set_state`): the last ``kernel - 1`` convolution inputs and ``S``, both
float32.

A prompt runs the chunked form of the rule (chunks of 64, as transformers and FLA do),
each decoded token the recurrent form; both in float32.

Example::

    layer = GatedDeltaNet(hidden=64, k_heads=2, v_heads=4, k_dim=16, v_dim=8, conv_kernel=4,
                          eps=1e-6, layer_key="0")
    y = layer(x, None, mask, cache)          # the mask's diagonal says which tokens are real
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from .layers import activation

__all__ = ["GatedDeltaNet", "gated_delta_chunked", "gated_delta_recurrent"]


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_recurrent(q, k, v, g, beta, state):
    """The rule token by token. `q`, `k` ``[B, H, T, Dk]`` (normed, q scaled), `v` ``[B, H,
    T, Dv]``, `g`, `beta` ``[B, H, T]``, `state` ``[B, H, Dk, Dv]``, all float32; returns
    (outputs ``[B, H, T, Dv]``, the new state)."""
    out = torch.zeros_like(v)
    for i in range(q.shape[2]):
        state = state * g[:, :, i].exp()[..., None, None]
        memory = (state * k[:, :, i, :, None]).sum(dim=-2)
        delta = (v[:, :, i] - memory) * beta[:, :, i, None]
        state = state + k[:, :, i, :, None] * delta[..., None, :]
        out[:, :, i] = (state * q[:, :, i, :, None]).sum(dim=-2)
    return out, state


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The same rule over chunks of `chunk` tokens (the WY form: within a chunk a
    triangular solve, between chunks the state); same arguments and results as
    `gated_delta_recurrent`."""
    b, h, t, dv = v.shape
    pad = (chunk - t % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // chunk
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(b, h, n, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    decay = g.reshape(b, h, n, chunk).cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False,
                                              unitriangular=True)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = torch.zeros_like(values)
    for i in range(n):
        v_new = values[:, :, i] - k_decayed[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(b, h, -1, dv)[:, :, :t], state


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm(x)`` (in x's dtype) times ``silu(gate)`` (float32), per head."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        f = x.float()
        normed = self.weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (normed * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """One linear-attention layer with Qwen3-Next's weights: ``in_proj_qkvz`` (per key
    head: its query, key, and its value heads' values and gates), ``in_proj_ba`` (per key
    head: its value heads' betas, then decays), ``conv1d`` (depthwise over q, k, v),
    ``dt_bias``, ``A_log``, ``norm`` and ``out_proj`` — or, not `fused` (Qwen3.5), the
    projections ``in_proj_qkv`` (all queries, keys, values), ``in_proj_z``, ``in_proj_b``,
    ``in_proj_a``. A layer of the decoder skeleton: no RoPE, no window; `layer_key` names
    its state in the cache."""

    rope_key = None
    sliding_window = None
    attention_chunk = None

    def __init__(self, *, hidden: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int,
                 conv_kernel: int, eps: float, layer_key: str, act: str = "silu",
                 fused: bool = True) -> None:
        super().__init__()
        if v_heads % k_heads:
            raise ValueError(f"linear_num_value_heads ({v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({k_heads})")
        self.layer_key = layer_key
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = k_heads, v_heads, k_dim, v_dim
        self.key_dim, self.value_dim = k_heads * k_dim, v_heads * v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = conv_kernel
        self.fused = fused
        if fused:
            self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(hidden, 2 * v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(hidden, v_heads, bias=False)
            self.in_proj_a = nn.Linear(hidden, v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                bias=False, padding=conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(v_heads))
        self.A_log = nn.Parameter(torch.zeros(v_heads))
        self.norm = GatedRMSNorm(v_dim, eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)
        self.act = activation(act)

    def kv_elements_per_token(self) -> int:
        return 0   # no cache that grows with the sequence

    def state_elements(self) -> int:
        """float32 elements of one sequence's state: convolution inputs and ``S``."""
        return self.conv_dim * (self.kernel - 1) + self.v_heads * self.k_dim * self.v_dim

    def _split(self, x: torch.Tensor):
        b, t, _ = x.shape
        if not self.fused:
            q, k, v = self.in_proj_qkv(x).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            return (q, k, v, self.in_proj_z(x).reshape(b, t, self.v_heads, self.v_dim),
                    self.in_proj_b(x), self.in_proj_a(x))
        r = self.v_heads // self.k_heads
        qkvz = self.in_proj_qkvz(x).view(b, t, self.k_heads, 2 * self.k_dim + 2 * r * self.v_dim)
        q, k, v, z = qkvz.split([self.k_dim, self.k_dim, r * self.v_dim, r * self.v_dim], dim=-1)
        beta, a = self.in_proj_ba(x).view(b, t, self.k_heads, 2 * r).split([r, r], dim=-1)
        return (q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1),
                z.reshape(b, t, self.v_heads, self.v_dim), beta.reshape(b, t, self.v_heads),
                a.reshape(b, t, self.v_heads))

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if mask is not None and t > 1:   # padding in: zeros (a mask's diagonal is 0 where real)
            real = mask[:, 0, :, -t:].diagonal(dim1=-2, dim2=-1) == 0
            x = x * real[..., None].to(x.dtype)
        q, k, v, z, beta, a = self._split(x)
        state = cache.state(self.layer_key) if cache is not None else None
        mixed = torch.cat((q, k, v), dim=-1).transpose(1, 2)            # [B, conv_dim, T]
        past = state["conv"].to(mixed.dtype) if state is not None else \
            mixed.new_zeros(b, self.conv_dim, self.kernel - 1)
        full = torch.cat((past, mixed), dim=-1)
        conv = self.act(F.conv1d(full.to(self.conv1d.weight.dtype), self.conv1d.weight,
                                 groups=self.conv_dim)).to(x.dtype).transpose(1, 2)
        q, k, v = conv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.v_heads // self.k_heads
        q, k = (y.reshape(b, t, self.k_heads, self.k_dim).repeat_interleave(r, dim=2) for y in (q, k))
        v = v.reshape(b, t, self.v_heads, self.v_dim)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        q, k, v, g, beta = (y.transpose(1, 2).float() for y in (q, k, v, g, beta.sigmoid()))
        q, k = _l2norm(q) * self.k_dim ** -0.5, _l2norm(k)
        s = state["recurrent"] if state is not None else \
            v.new_zeros(b, self.v_heads, self.k_dim, self.v_dim)
        rule = gated_delta_recurrent if state is not None and t == 1 else gated_delta_chunked
        out, s = rule(q, k, v, g, beta, s)
        if cache is not None:
            cache.set_state(self.layer_key, t, conv=full[..., full.shape[-1] - self.kernel + 1:].float(),
                            recurrent=s)
        out = self.norm(out.transpose(1, 2).to(x.dtype), z)
        return self.out_proj(out.reshape(b, t, -1))
