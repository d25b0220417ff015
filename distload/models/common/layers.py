"""Norms, activations and MLPs the built-in families share, with Hugging Face's parameter
names and numerics (statistics in float32; each family's own rule for where the weight
is applied, which decides bfloat16 results).

Example::

    norm = RMSNorm(4096, eps=1e-5)                  # Llama: weight * normed.to(dtype)
    norm = RMSNorm(2304, style="gemma")             # Gemma: normed * (1 + weight)
    mlp = GatedMLP(4096, 14336, act="silu")         # gate_proj, up_proj, down_proj
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "LayerNormNoBias", "activation", "ACTIVATIONS", "GatedMLP", "FusedGatedMLP",
           "PlainMLP", "Conv1D", "UpDownMLP", "linear_flops", "linear_outputs"]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


# config.json's `hidden_act` names (transformers' ACT2FN) → functions.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "relu": F.relu, "relu2": _relu2,
}


def activation(name: str, field: str = "hidden_act") -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name`; ValueError naming `field` when it is unknown."""
    fn = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"{field} {name!r} is not supported; distload supports "
                         f"{', '.join(ACTIVATIONS)}")
    return fn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, statistics in float32.

    `style` is where the weight goes, as each family's transformers code does it:
    ``"llama"`` ``weight * normed.to(dtype)``; ``"gemma"`` ``(normed * (1 + weight)).to(dtype)``
    (its weight is stored zero-centred); ``"olmo"`` ``(weight * normed).to(dtype)``.
    `shape` may be ``(heads, head_dim)`` for a per-head weight.
    """

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-6, *, style: str = "llama") -> None:
        super().__init__()
        if style not in ("llama", "gemma", "olmo"):
            raise ValueError(f"unknown RMSNorm style {style!r}")
        self.weight = nn.Parameter(torch.zeros(shape) if style == "gemma" else torch.ones(shape))
        self.eps, self.style = eps, style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.style == "llama":
            return self.weight * normed.to(dtype)
        if self.style == "gemma":
            return (normed * (1.0 + self.weight.float())).to(dtype)
        return (self.weight * normed).to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, style={self.style}"


class LayerNormNoBias(nn.Module):
    """Cohere's layer norm: mean and variance in float32, a weight and no bias; `shape`
    ``(heads, head_dim)`` normalizes each head with its own weight."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(variance + self.eps)
        return (self.weight.float() * x).to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU, GeGLU)."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """A gated MLP whose gate and up projections are one matrix, ``gate_up_proj`` (gate
    rows first), as Phi-3 and GLM-4 store it."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with `weight` stored ``[in, out]``, the
    transpose of `nn.Linear`'s, as its checkpoints hold it (so it loads as stored, no copy).
    Counted as a Linear by the planner (`in_features`, `out_features`, `active_flops`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    def active_flops(self) -> float:
        return 2.0 * self.in_features * self.out_features

    def active_activations(self) -> int:
        return self.out_features


class PlainMLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with biases (StarCoder2; `linear` = `Conv1D`: GPT-2)."""

    def __init__(self, hidden: int, intermediate: int, *, act: str, bias: bool = True,
                 linear: Callable[..., nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.c_fc = linear(hidden, intermediate, bias=bias)
        self.c_proj = linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class UpDownMLP(nn.Module):
    """``down_proj(act(up_proj(x)))``, no gate (Nemotron, Arcee, Apertus: relu² or xIELU).
    `act` is a `hidden_act` name or a module of its own (with parameters: xIELU), kept
    as ``act_fn`` so that its weights load under the checkpoint's names."""

    def __init__(self, hidden: int, intermediate: int, *, act: str | nn.Module, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = activation(act) if isinstance(act, str) else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def linear_flops(module: nn.Module) -> float:
    """Per-token FLOPs of `module`: ``2 * in * out`` for each `nn.Linear`, except that a
    submodule defining ``active_flops()`` (a mixture of experts) counts what it says
    instead of its Linears.

    Example::

        linear_flops(nn.Linear(4, 8))     # 64.0
    """
    return _per_token(module, "active_flops", lambda m: 2.0 * m.in_features * m.out_features)


def linear_outputs(module: nn.Module) -> int:
    """Activation elements per token that `module`'s Linears produce, a submodule
    defining ``active_activations()`` counting what it says (only the active experts run).

    Example::

        linear_outputs(nn.Linear(4, 8))   # 8
    """
    return int(_per_token(module, "active_activations", lambda m: m.out_features))


def _per_token(module: nn.Module, hook: str, of_linear: Callable[[nn.Linear], float]) -> float:
    own = getattr(module, hook, None)
    if callable(own):
        return own()
    if isinstance(module, nn.Linear):
        return of_linear(module)
    return sum(_per_token(child, hook, of_linear) for child in module.children())
