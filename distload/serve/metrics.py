"""The server's figures in Prometheus' text format (``GET /metrics``): requests by
endpoint and HTTP status, prompt and generated tokens, time to first token and between
tokens (histograms), and the scheduler's gauges (queue depth, running sequences, KV-cache
slots used and total).

Updated from the HTTP thread and the scheduler's thread at once, under one lock.

Example::

    m = Metrics()
    m.request("/v1/completions", 200)
    m.ttft.observe(0.12)
    m.render()   # "# HELP distload_requests_total ...\\n..."
"""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Metrics", "Histogram"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, lock: threading.Lock, buckets=_LATENCY_BUCKETS) -> None:
        self._lock, self.buckets = lock, buckets
        self.counts = [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        with self._lock:
            self.total += value
            self.count += 1
            for i, edge in enumerate(self.buckets):
                if value <= edge:
                    self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counters, histograms, and gauges read from the scheduler when rendered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()   # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(self.lock)
        self.itl = Histogram(self.lock)
        self.gauges = lambda: {}             # the scheduler's, once it runs

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self) -> str:
        gauges = self.gauges()
        with self.lock:
            lines = ["# HELP distload_requests_total HTTP requests by endpoint and status.",
                     "# TYPE distload_requests_total counter"]
            lines += [f'distload_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP distload_prompt_tokens_total Prompt tokens of admitted requests.",
                      "# TYPE distload_prompt_tokens_total counter",
                      f"distload_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP distload_generation_tokens_total Tokens generated.",
                      "# TYPE distload_generation_tokens_total counter",
                      f"distload_generation_tokens_total {self.generated_tokens}",
                      "# HELP distload_time_to_first_token_seconds From arrival to the first token.",
                      "# TYPE distload_time_to_first_token_seconds histogram",
                      *self.ttft.lines("distload_time_to_first_token_seconds"),
                      "# HELP distload_inter_token_latency_seconds Between a sequence's tokens.",
                      "# TYPE distload_inter_token_latency_seconds histogram",
                      *self.itl.lines("distload_inter_token_latency_seconds")]
        for name, (value, help_text) in gauges.items():
            lines += [f"# HELP distload_{name} {help_text}", f"# TYPE distload_{name} gauge",
                      f"distload_{name} {value}"]
        return "\n".join(lines) + "\n"
