"""DeepSeek's mixture of experts: a router that may limit each token to the best groups of
experts, routed experts scaled by `routed_scaling_factor`, and shared experts that every
token runs. The numerics follow transformers' DeepSeek-V2/V3 code: router logits in
float32, routing weights kept in float32 when they scale the experts' outputs, experts
visited in ascending order and summed with `index_add_`.

Routing methods (`GroupedTopKRouter.method`):

* ``"greedy"`` — softmax over the experts, top-k (DeepSeek-V2's default);
* ``"group_limited_greedy"`` — softmax; keep the `topk_group` groups whose best expert
  scores highest, zero the others, top-k (DeepSeek-V2);
* ``"noaux_tc"`` — sigmoid scores; the choice adds `e_score_correction_bias` (a learnt
  per-expert bias, a checkpoint tensor), ranks groups by the sum of their two best biased
  scores, keeps `topk_group`, takes the top-k of those; the weights are the unbiased
  scores, renormalized with `norm_topk_prob` (DeepSeek-V3, Kimi K2).

Example::

    gate = GroupedTopKRouter(hidden=64, experts=8, top_k=2, method="noaux_tc", groups=4,
                             topk_group=2, norm_topk_prob=True, scaling=2.5)
    moe = RoutedExperts(gate, [GatedMLP(64, 24) for _ in range(8)], shared=GatedMLP(64, 48))
    y = moe(x)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import linear_flops, linear_outputs

__all__ = ["GroupedTopKRouter", "RoutedExperts", "ROUTING_METHODS",
           "GroupLimitedRouter", "GroupLimitedMoE", "run_experts"]

ROUTING_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class GroupedTopKRouter(nn.Module):
    """The router of one layer (named ``gate`` in checkpoints): ``weight`` ``[experts,
    hidden]`` and, for ``noaux_tc``, ``e_score_correction_bias`` ``[experts]``. Returns
    (weights ``[N, top_k]`` float32, chosen experts ``[N, top_k]``)."""

    def __init__(self, *, hidden: int, experts: int, top_k: int, method: str, groups: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = False, scaling: float = 1.0) -> None:
        super().__init__()
        if method not in ROUTING_METHODS:
            raise ValueError(f"topk_method {method!r} is not supported; distload supports "
                             f"{', '.join(ROUTING_METHODS)}")
        if not 1 <= top_k <= experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number "
                             f"of routed experts ({experts})")
        if method != "greedy":
            if experts % groups:
                raise ValueError(f"n_group ({groups}) must divide the number of routed experts ({experts})")
            if not 1 <= topk_group <= groups:
                raise ValueError(f"topk_group ({topk_group}) must be between 1 and n_group ({groups})")
            if top_k > topk_group * (experts // groups):
                raise ValueError(f"num_experts_per_tok ({top_k}) exceeds the experts of the "
                                 f"topk_group ({topk_group}) groups kept")
            if method == "noaux_tc" and experts // groups < 2:
                raise ValueError(f"noaux_tc routing ranks groups by their two best experts: "
                                 f"n_group ({groups}) leaves fewer than 2 per group")
        self.weight = nn.Parameter(nn.init.normal_(torch.empty(experts, hidden), std=0.02))
        if method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(experts))
        self.experts, self.top_k, self.method = experts, top_k, method
        self.groups, self.topk_group = groups, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        keep = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, keep, 1)
        per_group = self.experts // self.groups
        return mask.unsqueeze(-1).expand(-1, self.groups, per_group).reshape(-1, self.experts).bool()

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(flat.float(), self.weight.float())
        n = flat.shape[0]
        if self.method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(n, self.groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(~self._group_mask(choice, group_scores), float("-inf"))
            chosen = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, chosen)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            if self.method == "group_limited_greedy":
                group_scores = scores.view(n, self.groups, -1).max(dim=-1).values
                scores = scores.masked_fill(~self._group_mask(scores, group_scores), 0.0)
            weights, chosen = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.scaling, chosen


class RoutedExperts(nn.Module):
    """``gate`` (a `GroupedTopKRouter`), ``experts`` (a ModuleList, one module per expert:
    the hub's ``mlp.experts.{e}.gate_proj.weight`` names) and, optionally,
    ``shared_experts`` run on every token and added."""

    def __init__(self, gate: GroupedTopKRouter, experts: Sequence[nn.Module], *,
                 shared: nn.Module | None = None) -> None:
        super().__init__()
        if len(experts) != gate.experts:
            raise ValueError(f"the router has {gate.experts} experts, not {len(experts)}")
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        if shared is not None:
            self.shared_experts = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, chosen = self.gate(flat)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():  # ascending, as transformers visits them
            token, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        out = out.view(shape)
        shared = getattr(self, "shared_experts", None)
        return out if shared is None else out + shared(x)

    def _always_on(self) -> list[nn.Module]:
        return [m for m in (getattr(self, "shared_experts", None),) if m is not None]

    def active_flops(self) -> float:
        """Per-token FLOPs: the router, `top_k` experts and the shared experts."""
        per_expert = sorted((linear_flops(e) for e in self.experts), reverse=True)
        router = 2.0 * self.gate.weight.shape[0] * self.gate.weight.shape[1]
        return router + sum(linear_flops(m) for m in self._always_on()) + sum(per_expert[:self.gate.top_k])

    def active_activations(self) -> int:
        """Activation elements per token: router logits, `top_k` experts', shared experts'."""
        per_expert = sorted((linear_outputs(e) for e in self.experts), reverse=True)
        return self.gate.experts + sum(linear_outputs(m) for m in self._always_on()) \
            + sum(per_expert[:self.gate.top_k])


# --- GLM-4.5's grouped routing (the same noaux_tc rule) and the shared expert runner ---
# Routing other than `SparseMoE`'s softmax top-k, and running the chosen experts.
# 
# * `GroupLimitedRouter` — DeepSeek-V3's "noaux_tc" routing, which GLM-4.5 (glm4_moe) uses
#   too: sigmoid scores in float32, a per-expert ``e_score_correction_bias`` added *for the
#   choice only*, the experts split into `n_group` groups of which the `topk_group` best
#   (each group scored by its two best experts) may be chosen, top-k among those, the
#   unbiased scores of the chosen renormalized (`norm_topk_prob`) and multiplied by
#   `routed_scaling_factor`.
# * `GroupLimitedMoE` — that router, routed experts and always-on ``shared_experts``, with
#   the hub's names (GLM-4.5, DeepSeek-V3);
# * `run_experts` — each chosen expert on its tokens, in ascending expert order, weighted
#   and summed with `index_add_` (transformers' order, so float32 results agree to
#   round-off).
# 
# Example::
# 
#     router = GroupLimitedRouter(hidden=64, experts=8, top_k=2, n_group=2, topk_group=1)
#     weights, chosen = router(flat)                    # [N, 2] float32, [N, 2] expert ids
#     out = run_experts(flat, experts, weights, chosen)


class GroupLimitedRouter(nn.Module):
    """The router of a DeepSeek-V3-style MoE: ``weight`` ``[E, H]`` and
    ``e_score_correction_bias`` ``[E]`` (a parameter here, so the checkpoint's tensor
    loads like any weight). Returns ``(weights [N, k] float32, chosen [N, k])``."""

    def __init__(self, *, hidden: int, experts: int, top_k: int, n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0) -> None:
        super().__init__()
        if experts % n_group:
            raise ValueError(f"n_routed_experts ({experts}) must be a multiple of n_group ({n_group})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group ({topk_group}) must be between 1 and n_group ({n_group})")
        if not 1 <= top_k <= experts // n_group * topk_group:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the experts of "
                             f"the topk_group best groups ({experts // n_group * topk_group})")
        self.weight = nn.Parameter(torch.zeros(experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts), requires_grad=False)
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(flat.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias.float()
        n, per_group = biased.shape[0], biased.shape[1] // self.n_group
        group_scores = biased.view(n, self.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(n, self.n_group, per_group).reshape(n, -1)
        biased = biased.masked_fill(~expert_mask.bool(), float("-inf"))
        chosen = torch.topk(biased, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, chosen


def run_experts(flat: torch.Tensor, experts: Sequence[nn.Module] | Callable[[int, torch.Tensor], torch.Tensor],
                weights: torch.Tensor, chosen: torch.Tensor, *, scale_inputs: bool = False) -> torch.Tensor:
    """``sum_k weights[:, k] * expert[chosen[:, k]](flat)`` over the tokens `flat` ``[N, H]``;
    `experts` is a sequence of modules or ``fn(e, x)``. `scale_inputs` weights each
    expert's input instead of its output (Llama 4)."""
    call = experts if callable(experts) and not isinstance(experts, nn.Module) \
        else (lambda e, x: experts[e](x))
    out = torch.zeros_like(flat)
    for e in torch.unique(chosen).tolist():   # ascending, as transformers visits them
        token, slot = torch.where(chosen == e)
        w = weights[token, slot, None]
        if scale_inputs:
            y = call(e, (flat[token] * w).to(flat.dtype))
        else:
            y = call(e, flat[token]) * w
        out.index_add_(0, token, y.to(out.dtype))
    return out


class GroupLimitedMoE(nn.Module):
    """``gate`` (a `GroupLimitedRouter`), ``experts`` (SwiGLU modules) and, if any,
    ``shared_experts`` (one SwiGLU on every token): DeepSeek-V3's MoE block, with the
    hub's names."""

    def __init__(self, *, hidden: int, router: GroupLimitedRouter, experts: list[nn.Module],
                 shared_experts: nn.Module | None) -> None:
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)
        if shared_experts is not None:
            self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        out = run_experts(flat, self.experts, weights, chosen)
        shared = getattr(self, "shared_experts", None)
        if shared is not None:
            out = out + shared(flat)
        return out.view(x.shape)

    def _always_on(self) -> tuple[float, int]:
        shared = getattr(self, "shared_experts", None)
        e, h = self.gate.weight.shape
        flops, acts = 2.0 * e * h, e
        if shared is not None:
            flops, acts = flops + linear_flops(shared), acts + linear_outputs(shared)
        return flops, acts

    def active_flops(self) -> float:
        """The router, the shared experts and `top_k` routed experts, per token."""
        return self._always_on()[0] + self.gate.top_k * linear_flops(self.experts[0])

    def active_activations(self) -> int:
        return self._always_on()[1] + self.gate.top_k * linear_outputs(self.experts[0])
