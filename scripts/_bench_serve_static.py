"""scripts/bench_serve.py's static-batching side, under torchrun: the same requests as the
server gets, through `pipe.generate` in fixed batches, as a launcher that wraps its own
server around `generate` runs them.

Rank 0 plays the clients too (closed loop, in-process: no HTTP cost, which only favours
this side): each of C clients sends its next request once its last one is answered. A
batch takes whatever is waiting (up to --max-batch-size), left-padded, generated to the
batch's largest `max_tokens`; every answer of the batch comes when the batch ends (so its
time to first token is its whole latency, and there is no inter-token latency). Other
ranks follow with `pipe.serve()`.

    torchrun --nproc_per_node=2 scripts/_bench_serve_static.py WORKLOAD.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque

import torch

import distload
from distload.cli.prompts import left_pad
from distload.pipeline.inputs import resolve_eos


def _run(pipe, requests: list[dict], clients: int, batch: int, eos: tuple[int, ...]) -> dict:
    queues = [deque(requests[c::clients]) for c in range(clients)]
    waiting: deque = deque()
    t0 = time.perf_counter()
    for c in range(clients):
        if queues[c]:
            waiting.append((c, queues[c].popleft(), t0))
    ttft, tokens = [], 0
    while waiting:
        take = [waiting.popleft() for _ in range(min(batch, len(waiting)))]
        ids, mask = left_pad([r["prompt"] for _, r, _ in take])
        out = pipe.generate(ids, mask, max_new_tokens=max(r["max_tokens"] for _, r, _ in take))
        done = time.perf_counter()
        for row, (c, r, arrived) in enumerate(take):
            new = out[row, ids.shape[1]:].tolist()[:r["max_tokens"]]
            end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            tokens += end
            ttft.append(done - arrived)
            if queues[c]:
                waiting.append((c, queues[c].popleft(), done))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "ttft": ttft, "itl": []}


def main() -> None:
    workload = json.loads(open(sys.argv[1]).read())
    pipe = distload.load(workload["model"], device="cpu", max_batch_size=workload["max_batch_size"],
                         max_seq_len=workload["max_seq_len"], workload="generate")
    if pipe.rank != 0:
        pipe.serve()
        return
    eos, _ = resolve_eos(None, None, pipe.plan.config)
    warm = workload["requests"][:2]
    _run(pipe, warm, 2, workload["max_batch_size"], eos)
    results = {str(c): _run(pipe, workload["requests"], c, workload["max_batch_size"], eos)
               for c in workload["concurrency"]}
    pipe.close()
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
