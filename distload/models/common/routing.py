"""Grouped top-k routing (DeepSeek-V2/V3, Kimi K2, GLM-4.5) and the runner of chosen
experts. The numerics follow transformers' DeepSeek-V2/V3 and GLM-4.5 code: router logits
in float32, routing weights kept in float32 when they scale the experts' outputs, experts
visited in ascending order and summed with `index_add_`.

Routing methods (`GroupedTopKRouter.method`):

* ``"greedy"`` — softmax over the experts, top-k (DeepSeek-V2's default);
* ``"group_limited_greedy"`` — softmax; keep the `topk_group` groups whose best expert
  scores highest, zero the others, top-k (DeepSeek-V2);
* ``"noaux_tc"`` — sigmoid scores; the choice adds `e_score_correction_bias` (a learnt
  per-expert bias, a checkpoint tensor), ranks groups by the sum of their two best biased
  scores, keeps `topk_group`, takes the top-k of those; the weights are the unbiased
  scores, renormalized with `norm_topk_prob` (DeepSeek-V3, Kimi K2, GLM-4.5 — one rule).

Whatever the model's dtype, the router computes in float32; a family keeps its router's
``gate.weight`` and ``e_score_correction_bias`` in float32 too (`ModelFamily.keep_float32`),
as transformers does, since a bias rounded to bfloat16 changes which experts are chosen.

* `GroupedTopKRouter` — the router (``gate`` in checkpoints);
* `ExpertMixture` — the per-token cost of a mixture with ``gate``, ``experts`` and
  optional ``shared_experts`` (the base of `RoutedExperts` and of families' own mixtures);
* `RoutedExperts` — that router, routed ``experts`` and optional always-on
  ``shared_experts``, under the hub's names;
* `noaux_tc_experts` — DeepSeek-V3's mixture of a config's fields (GLM-4.5, dots.llm1,
  EXAONE MoE);
* `run_experts` — each chosen expert on its tokens, weighted and summed (also gpt-oss's
  and Llama 4's, whose routers differ);
* `check_grouped_routing` — the routing's sizes checked when a config is read.

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

from .layers import GatedMLP, linear_flops, linear_outputs

__all__ = ["GroupedTopKRouter", "ExpertMixture", "RoutedExperts", "ROUTING_METHODS", "ROUTER_FLOAT32",
           "check_grouped_routing", "noaux_tc_experts", "run_experts"]

ROUTING_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# The router parameters a family keeps in float32 under a bfloat16/float16 load
# (`ModelFamily.keep_float32`; transformers' `_keep_in_fp32_modules_strict` of DeepSeek-V3
# and GLM-4.5; DeepSeek-V2 keeps the weight only).
ROUTER_FLOAT32 = (r"\.gate\.weight$", r"\.e_score_correction_bias$")


def check_grouped_routing(*, method: str, experts: int, top_k: int, groups: int = 1,
                          topk_group: int = 1) -> None:
    """ValueError naming the config field when the routing cannot run (pure; a family
    calls it while reading config.json, before anything is built)."""
    if method not in ROUTING_METHODS:
        raise ValueError(f"topk_method {method!r} is not supported; distload supports "
                         f"{', '.join(ROUTING_METHODS)}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number "
                         f"of routed experts ({experts})")
    if method == "greedy":
        return
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


class GroupedTopKRouter(nn.Module):
    """The router of one layer (named ``gate`` in checkpoints): ``weight`` ``[experts,
    hidden]`` and, for ``noaux_tc``, ``e_score_correction_bias`` ``[experts]`` (a
    parameter here, so the checkpoint's tensor loads like any weight). Returns (weights
    ``[N, top_k]`` float32, chosen experts ``[N, top_k]``)."""

    def __init__(self, *, hidden: int, experts: int, top_k: int, method: str, groups: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = False, scaling: float = 1.0) -> None:
        super().__init__()
        check_grouped_routing(method=method, experts=experts, top_k=top_k, groups=groups,
                              topk_group=topk_group)
        self.weight = nn.Parameter(nn.init.normal_(torch.empty(experts, hidden), std=0.02))
        if method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(experts), requires_grad=False)
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


class ExpertMixture(nn.Module):
    """A mixture of ``gate`` (a router with ``weight`` ``[experts, hidden]`` and ``top_k``),
    ``experts`` (a ModuleList) and, optionally, ``shared_experts`` run on every token; a
    subclass sets them and its forward. Its per-token cost (what `linear_flops` and
    `linear_outputs` count): the router, the `top_k` largest experts, the shared experts."""

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
        return self.gate.weight.shape[0] + sum(linear_outputs(m) for m in self._always_on()) \
            + sum(per_expert[:self.gate.top_k])


class RoutedExperts(ExpertMixture):
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
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        out = run_experts(flat, self.experts, weights, chosen).view(x.shape)
        shared = getattr(self, "shared_experts", None)
        return out if shared is None else out + shared(x)


def noaux_tc_experts(config, *, experts: int, shared_experts: int) -> RoutedExperts:
    """A ``noaux_tc`` router over `experts` gated MLPs ``config.moe_intermediate_size``
    wide and, with `shared_experts` > 0, one always-on gated MLP that many times as wide
    (none with 0: transformers' is 0 wide and adds nothing). `config` gives the other
    fields under DeepSeek-V3's names (``hidden_size``, ``hidden_act``,
    ``num_experts_per_tok``, ``n_group``, ``topk_group``, ``norm_topk_prob``,
    ``routed_scaling_factor``)."""
    h, i, act = config.hidden_size, config.moe_intermediate_size, config.hidden_act
    router = GroupedTopKRouter(hidden=h, experts=experts, top_k=config.num_experts_per_tok,
                               method="noaux_tc", groups=config.n_group, topk_group=config.topk_group,
                               norm_topk_prob=config.norm_topk_prob, scaling=config.routed_scaling_factor)
    shared = GatedMLP(h, i * shared_experts, act=act) if shared_experts else None
    return RoutedExperts(router, [GatedMLP(h, i, act=act) for _ in range(experts)], shared=shared)


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
