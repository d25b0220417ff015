"""Exact contiguous partitions: split a sequence of unit costs into `parts` non-empty
runs so that the largest run cost is as small as possible."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["min_max_partition"]


def min_max_partition(costs: Sequence[float], parts: int) -> tuple[int, ...]:
    """Return the `parts + 1` boundaries `b` (b[0] = 0, b[-1] = len(costs)) of the
    contiguous split minimising max(sum(costs[b[i]:b[i+1]])). Every run is non-empty.

    Exact dynamic programme, O(parts * n^2) — n is a few hundred units at most. Ties go
    to the split whose earlier runs are longest, so the result is deterministic.

    Example::

        min_max_partition([1, 1, 1, 3], 2)   # (0, 3, 4): runs of cost 3 and 3
    """
    n = len(costs)
    if parts < 1 or parts > n:
        raise ValueError(f"cannot split {n} units into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: the smallest bottleneck splitting costs[:i] into k runs; cut[k][i]: last cut
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(i - 1, k - 2, -1):  # last run is costs[j:i]; longest last run last
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(reversed(bounds))

