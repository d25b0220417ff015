"""Serving: continuous batching against static batching and one process, in one run.

The same requests (random prompts of --prompt-min..--prompt-max tokens, each asking for
--tokens-min..--tokens-max new ones, greedy; EOS ends one early) go, for each number of
concurrent clients in --concurrency (closed loop: a client sends its next request once
its last is answered), through:

* continuous: ``torchrun --nproc_per_node=--ranks -m distload.serve`` (continuous
  batching over the pipeline), streamed over HTTP;
* static: the same ranks, requests through `pipe.generate` in fixed batches of what is
  waiting (`_bench_serve_static.py`: a launcher's own loop around generate; its answers
  come when the batch ends, so time to first token is the whole latency);
* one process: ``distload.serve`` with one rank (the whole model, continuous batching).

Printed per method and client count: output tokens/s (all requests' tokens over the wall
time), p50/p95 time to first token, p50/p95 inter-token latency. On the CPU every rank has
one thread; on a shared machine the figures carry its noise (run it when quiet).

Example::

    python scripts/bench_serve.py                          # the demo model, 2 ranks
    python scripts/bench_serve.py --model ./llama --requests 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="checkpoint directory or 'demo'")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--requests", type=int, default=32, help="requests per client count")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch-size", type=int, default=16, help="KV slots (continuous) / batch (static)")
    p.add_argument("--prompt-min", type=int, default=4)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--tokens-min", type=int, default=4)
    p.add_argument("--tokens-max", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["continuous", "static", "one-process"])
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def _vocab(model: str) -> int:
    if model == "demo":
        from distload.sources.demo import DEMO_CONFIG

        return DEMO_CONFIG["vocab_size"]
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def _workload(a) -> dict:
    rng, vocab = random.Random(a.seed), _vocab(a.model)
    requests = [{"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(a.prompt_min, a.prompt_max))],
                 "max_tokens": rng.randint(a.tokens_min, a.tokens_max)} for _ in range(a.requests)]
    return {"model": a.model, "requests": requests, "concurrency": a.concurrency,
            "max_batch_size": a.max_batch_size, "max_seq_len": a.prompt_max + a.tokens_max + 8}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    repo = str(HERE.parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p)}


def _clients(url: str, requests: list[dict], clients: int) -> dict:
    """Closed-loop streaming clients; each token's arrival time is recorded."""
    import httpx

    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(mine: list[dict]) -> None:
        with httpx.Client(timeout=600) as http:
            for r in mine:
                body = {"model": "bench", "prompt": r["prompt"], "max_tokens": r["max_tokens"],
                        "temperature": 0, "stream": True}
                sent, times = time.perf_counter(), []
                with http.stream("POST", url + "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    for line in resp.iter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            times += [time.perf_counter()] * len(choice.get("token_ids") or [])
                with lock:
                    tokens[0] += len(times)
                    if times:
                        ttft.append(times[0] - sent)
                        itl.extend(b - a for a, b in zip(times, times[1:]))

    threads = [threading.Thread(target=client, args=(requests[c::clients],)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "tokens": tokens[0], "ttft": ttft, "itl": itl}


def _server(a, work: dict, ranks: int) -> dict:
    port = _port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "distload.serve", "--model", a.model, "--port", str(port), "--served-model-name", "bench",
           "--device", "cpu", "--max-batch-size", str(a.max_batch_size),
           "--max-seq-len", str(work["max_seq_len"]), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 600 s")
            time.sleep(0.2)
        _clients(url, work["requests"][:2], 2)  # warm-up
        return {str(c): _clients(url, work["requests"], c) for c in work["concurrency"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _static(a, work: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "work.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(work))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.ranks}",
               str(HERE / "_bench_serve_static.py"), str(spec), str(out)]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the static-batching run failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _figures(run: dict) -> dict:
    return {"tokens_per_second": run["tokens"] / run["seconds"], "tokens": run["tokens"],
            "seconds": run["seconds"],
            "ttft_p50_ms": _ms(_pct(run["ttft"], 0.5)), "ttft_p95_ms": _ms(_pct(run["ttft"], 0.95)),
            "itl_p50_ms": _ms(_pct(run["itl"], 0.5)), "itl_p95_ms": _ms(_pct(run["itl"], 0.95))}


def _ms(x):
    return None if x is None else x * 1000


def _table(results: dict) -> str:
    def cell(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    rows = ["| method | clients | output tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |",
            "|---|---|---|---|---|---|---|"]
    for method, by_clients in results.items():
        for c, f in by_clients.items():
            rows.append(f"| {method} | {c} | {cell(f['tokens_per_second'])} | {cell(f['ttft_p50_ms'])} | "
                        f"{cell(f['ttft_p95_ms'])} | {cell(f['itl_p50_ms'])} | {cell(f['itl_p95_ms'])} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    a = _args(argv)
    work = _workload(a)
    runs = {}
    if "continuous" not in a.skip:
        runs[f"continuous ({a.ranks} ranks)"] = _server(a, work, a.ranks)
    if "static" not in a.skip:
        runs[f"static generate ({a.ranks} ranks)"] = _static(a, work)
    if "one-process" not in a.skip:
        runs["one process (continuous)"] = _server(a, work, 1)
    results = {m: {c: _figures(r) for c, r in by.items()} for m, by in runs.items()}
    print(f"{a.requests} requests per row, prompts {a.prompt_min}-{a.prompt_max} tokens, "
          f"{a.tokens_min}-{a.tokens_max} new tokens, --max-batch-size {a.max_batch_size}, model {a.model}")
    print(_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
