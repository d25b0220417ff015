"""Rotary position embeddings: the parameters read from a config.json, the inverse
frequencies of each RoPE type, the cos/sin tables, and applying them to queries and keys.

RoPE types (transformers' `ROPE_INIT_FUNCTIONS` names): ``default``, ``linear``,
``llama3``, ``yarn`` (the long-context scaling Qwen's and others' model cards add:
interpolated low frequencies, extrapolated high ones, a linear ramp between, and an
attention factor on cos/sin) and ``longrope`` (Phi-3's "su" scaling: short factors up to
the pretraining length, long factors beyond it, and an attention factor on cos/sin).
``dynamic`` (NTK) is refused: transformers recomputes it statefully as sequences grow. A partial rotary
factor rotates only the first ``head_dim * factor`` channels of each head; the
interleaved style (GLM-4, Cohere) rotates channel pairs (0, 1), (2, 3), ... instead of
the halves (i, i + d/2). ``proportional`` (Gemma 4's global layers) rotates the whole head
with the first ``head_dim * partial_rotary_factor / 2`` frequencies of a full-width RoPE
and zero for the rest (those channels pass through), all divided by `factor` (default 1).

Example::

    rope = read_rope(config_dict, default_theta=10000.0, max_positions=4096)
    emb = RotaryEmbedding(rope, head_dim=128, max_positions=4096)
    cos, sin = emb(hidden, position_ids)
    q, k = apply_rope(q, k, cos, sin)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["RopeParams", "read_rope", "rope_inv_freq", "rope_attention_scaling", "RotaryEmbedding",
           "apply_rope"]

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "longrope", "proportional")


@dataclass(frozen=True)
class RopeParams:
    """One RoPE: its type, base `theta` and the scaling parameters its type uses."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    # yarn: the ramp's bounds in rotations, the attention factor's inputs, rounding the ramp
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    partial_rotary_factor: float = 1.0

    def scaling_dict(self) -> dict[str, Any] | None:
        """The scaling as transformers 4's ``rope_scaling`` (None for plain RoPE)."""
        if self.rope_type == "default":
            return None
        d = {k: v for k, v in asdict(self).items()
             if v is not None and k not in ("theta", "partial_rotary_factor")}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_rope(d: dict[str, Any], *, default_theta: float, max_positions: int,
              allowed: tuple[str, ...] = ("default", "linear", "llama3", "yarn"),
              aliases: dict[str, str] | None = None, params: dict | None = None,
              partial_rotary_factor: float | None = None, field: str | None = None
              ) -> RopeParams:
    """The RoPE of config.json dict `d`, from either transformers 4's layout (`rope_theta`
    + `rope_scaling`, with `type` or `rope_type`) or 5's (`rope_parameters`); `params`
    overrides where the family nests them (Gemma 3's per-layer-type dicts, named by
    `field`). `aliases` maps legacy type names (Phi-3: "su" → "longrope"). Absent and null
    keys take their defaults; anything else wrong raises ValueError naming the field.

    Example::

        read_rope({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4}},
                  default_theta=1e4, max_positions=2048).factor      # 4.0
    """
    if params is None:
        field = field or ("rope_scaling" if d.get("rope_scaling") else "rope_parameters")
        params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    field = field or "rope_parameters"
    if not isinstance(params, dict):
        raise ValueError(f"{field} must be an object, not {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    theta = _number(d.get("rope_theta") if theta is None else theta, "rope_theta", default_theta)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if not isinstance(rope_type, str):
        raise ValueError(f"{field}.rope_type must be a string, not {rope_type!r}")
    rope_type = (aliases or {}).get(rope_type, rope_type)
    if rope_type not in allowed:
        raise ValueError(f"{field}.rope_type {rope_type!r} is not supported for this model; "
                         f"distload supports {', '.join(allowed)}")
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = d.get("partial_rotary_factor")
    partial = _number(partial, "partial_rotary_factor", partial_rotary_factor or 1.0)
    if partial > 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], not {partial}")
    if rope_type == "default":
        return RopeParams(theta=theta, partial_rotary_factor=partial)
    if rope_type == "proportional":
        factor = params.get("factor")
        return RopeParams("proportional", theta, factor=1.0 if factor is None else _number(factor, f"{field}.factor"),
                          partial_rotary_factor=partial)

    def need(key: str) -> Any:
        if params.get(key) is None:
            raise ValueError(f"{field} of RoPE type {rope_type!r} needs {key!r}")
        return params[key]

    def factors(key: str) -> tuple[float, ...]:
        value = need(key)
        if not isinstance(value, list):
            raise ValueError(f"{field}.{key} must be a list of numbers, not {value!r}")
        return tuple(_number(v, f"{field}.{key}") for v in value)

    # A pretraining length beside the RoPE dict (Phi-3 keeps it there) wins, as in transformers.
    original = d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or max_positions
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"original_max_position_embeddings must be a positive integer, not {original!r}")
    if rope_type == "linear":
        return RopeParams("linear", theta, factor=_number(need("factor"), f"{field}.factor"),
                          partial_rotary_factor=partial)
    if rope_type == "llama3":
        low = _number(need("low_freq_factor"), f"{field}.low_freq_factor")
        high = _number(need("high_freq_factor"), f"{field}.high_freq_factor")
        if high <= low:
            raise ValueError(f"{field}.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        return RopeParams("llama3", theta, factor=_number(need("factor"), f"{field}.factor"),
                          low_freq_factor=low, high_freq_factor=high,
                          original_max_position_embeddings=original, partial_rotary_factor=partial)
    if rope_type == "yarn":
        return _read_yarn(params, theta, original, max_positions, partial, field)
    short, long = factors("short_factor"), factors("long_factor")
    if len(short) != len(long):
        raise ValueError(f"{field}.short_factor and long_factor differ in length "
                         f"({len(short)} != {len(long)})")
    factor, attention = params.get("factor"), params.get("attention_factor")
    return RopeParams("longrope", theta,
                      factor=None if factor is None else _number(factor, f"{field}.factor"),
                      original_max_position_embeddings=original, short_factor=short, long_factor=long,
                      attention_factor=None if attention is None else _number(attention, f"{field}.attention_factor"),
                      partial_rotary_factor=partial)


def _read_yarn(params: dict, theta: float, original: int, max_positions: int, partial: float,
               field: str) -> RopeParams:
    """YaRN's parameters; without `factor`, the context's growth over pretraining (as
    transformers reads DeepSeek-V3's)."""
    def optional(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else _number(value, f"{field}.{key}")

    factor = optional("factor")
    if factor is None:
        factor = max_positions / original
    truncate = params.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise ValueError(f"{field}.truncate must be true or false, not {truncate!r}")
    return RopeParams("yarn", theta, factor=factor, original_max_position_embeddings=original,
                      attention_factor=optional("attention_factor"), beta_fast=optional("beta_fast"),
                      beta_slow=optional("beta_slow"), mscale=optional("mscale"),
                      mscale_all_dim=optional("mscale_all_dim"), truncate=truncate,
                      partial_rotary_factor=partial)


def _number(value: Any, field: str, default: float | None = None) -> float:
    """`value` as a positive finite float (`default` when None); ValueError naming `field`."""
    if value is None and default is not None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{field} must be a positive number, not {value!r}")
    return float(value)


def rotary_dim(rope: RopeParams, head_dim: int) -> int:
    """Channels of each head that RoPE rotates."""
    if rope.rope_type == "proportional":   # full width; the channels past its frequencies turn by 0
        return head_dim
    return int(head_dim * rope.partial_rotary_factor)


def rope_inv_freq(rope: RopeParams, head_dim: int, device: torch.device | str | None = None, *,
                  long: bool = False) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32), as transformers computes them;
    `long` selects longrope's long factors.

    Example::

        rope_inv_freq(RopeParams(theta=1e4), 64).shape     # (32,)
    """
    if rope.rope_type == "proportional":
        return _proportional_inv_freq(rope, head_dim, device)
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if rope.rope_type == "longrope":
        factors = rope.long_factor if long else rope.short_factor
        if len(factors) != dim // 2:
            raise ValueError(f"longrope {'long' if long else 'short'}_factor has "
                             f"{len(factors)} entries; rotating {dim} channels needs {dim // 2}")
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        return 1.0 / (ext * rope.theta ** exponents)
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim, rope.theta ** exponents)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _proportional_inv_freq(rope: RopeParams, head_dim: int, device) -> torch.Tensor:
    """``[head_dim // 2]``: the first ``int(partial * head_dim // 2)`` frequencies of a
    full-width RoPE (exponents over `head_dim`), zeros after, divided by `factor` (as
    transformers' `_compute_proportional_rope_parameters`)."""
    angles = int(rope.partial_rotary_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    rest = head_dim // 2 - angles
    if rest > 0:
        inv_freq = torch.cat((inv_freq, torch.zeros(rest, dtype=torch.float32, device=device)))
    return inv_freq / (rope.factor or 1.0)


def _yarn_inv_freq(rope: RopeParams, dim: int, wavelengths: torch.Tensor) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than `beta_slow` times over the pretraining length
    are divided by `factor` (interpolated), those turning more than `beta_fast` times are
    kept (extrapolated), with a linear ramp over the channels between. (Operations in
    transformers' order: the frequencies are bit-identical.)"""
    def channel(rotations: float) -> float:   # the channel that turns `rotations` times
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) \
            / (2 * math.log(rope.theta))

    low, high = channel(rope.beta_fast or 32), channel(rope.beta_slow or 1)
    if rope.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=wavelengths.device) - low)
            / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return 1.0 / (rope.factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_scaling(rope: RopeParams, max_positions: int) -> float:
    """The factor on cos and sin (longrope's and yarn's attention factor; 1 otherwise)."""
    if rope.rope_type not in ("longrope", "yarn"):
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.rope_type == "yarn":
        if rope.mscale and rope.mscale_all_dim:
            return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
        return _yarn_mscale(rope.factor)
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[B, T, rotary_dim]`` for given positions, in the activations' dtype.
    The frequencies are non-persistent buffers (never in a checkpoint): after
    materializing from meta call `init_buffers(device)`.

    Longrope uses its long factors for a forward whose largest position reaches past the
    pretraining length, as transformers does per call (a pipeline decides per micro-batch).
    """

    def __init__(self, rope: RopeParams, *, head_dim: int, max_positions: int,
                 interleaved: bool = False) -> None:
        super().__init__()
        self.rope, self.head_dim, self.interleaved = rope, head_dim, interleaved
        self.scaling = rope_attention_scaling(rope, max_positions)
        # on the CPU even under a meta device context (cheap; meta kernels cost seconds to load)
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim, "cpu"), persistent=False)
        if rope.rope_type == "longrope":
            self.register_buffer("long_inv_freq", rope_inv_freq(rope, head_dim, "cpu", long=True),
                                 persistent=False)
        else:
            self.long_inv_freq = None

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequencies on `device` (default: where they are, unless meta)."""
        if device is None:
            device = self.inv_freq.device if not self.inv_freq.is_meta else "cpu"
        self.inv_freq = rope_inv_freq(self.rope, self.head_dim, device)
        if self.long_inv_freq is not None:
            self.long_inv_freq = rope_inv_freq(self.rope, self.head_dim, device, long=True)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.long_inv_freq is not None and \
                int(position_ids.max()) + 1 > self.rope.original_max_position_embeddings:
            inv_freq = self.long_inv_freq
        # float32 whatever x's dtype: bf16 positions * frequencies lose whole radians.
        freqs = position_ids[..., None].float() * inv_freq.to(x.device, torch.float32)
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               interleaved: bool = False, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q`, `k` ``[B, heads, T, head_dim]`` by `cos`, `sin` ``[B, T, rotary_dim]``;
    channels past `rotary_dim` pass through. `upcast` rotates in float32 (Cohere).

    Example::

        q, k = apply_rope(q, k, *rotary(hidden, positions))
    """
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D] against [B, heads, T, D]
    rotate = _rotate_pairs if interleaved else _rotate_half
    dim = cos.shape[-1]
    out = []
    for x in (q, k):
        if dim == x.shape[-1]:
            out.append(x * cos + rotate(x) * sin)
        else:
            x_rot, x_pass = x[..., :dim], x[..., dim:]
            out.append(torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1))
    return out[0].to(dtype), out[1].to(dtype)
