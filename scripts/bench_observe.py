"""What watching a load costs: the job's progress reporting and ``--trace``, on and off, in
one run.

Each mode loads the same checkpoint with the CLI (``--max-new-tokens 0 --report``) on
`--nproc` CPU ranks under torchrun, every run a fresh torchrun, modes interleaved
(each round starting with the next mode), `--repeats` times, page cache warm:

* off:            ``DISTLOAD_PROGRESS=0`` (the board still serves the waits between ranks);
* progress:       the default (stderr is not a terminal here: log lines every 10 s, each
                  rank writing its state to the job's store at most every 0.2 s, rank 0
                  reading them all every 0.5 s);
* progress+trace: the default plus ``--trace`` (every span recorded, gathered on rank 0,
                  written as JSON).

Per mode it prints the medians of the slowest rank's ``load_seconds`` (its whole
`load_stage`: read, waits, exchange, tiers) and ``read_seconds``, of the job's wall
seconds (the torchrun, start to exit), and their ratios to ``off``. Then, in this
process, the cost of one instrumented step: a ``trace.span`` with tracing off and on, and
one reader progress call (beside an empty Python function call, for the machine's speed).

Example::

    python scripts/make_checkpoint.py /tmp/ckpt-1.4gb --preset 1.4gb
    python scripts/bench_observe.py /tmp/ckpt-1.4gb --nproc 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from bench_load import warm_cache  # a sibling script: its folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"off": ({"DISTLOAD_PROGRESS": "0"}, False), "progress": ({}, False),
         "progress+trace": ({}, True)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path, help="checkpoint directory")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dtype", help="--dtype for the loads (a cast reads through the staging "
                                   "buffers instead of mapping pages: more, smaller reads)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per torchrun")
    p.add_argument("--json", type=Path, help="also write every figure here")
    return p.parse_args(argv)


def one_run(a, mode: str, tmp: Path) -> dict:
    env_extra, traced = MODES[mode]
    report = tmp / f"report-{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           "-m", "distload.load", "--device", "cpu", "--model", str(a.ckpt), "--max-new-tokens", "0",
           "--report", str(report)]
    if traced:
        cmd += ["--trace", str(tmp / "trace.json")]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: torchrun failed\n{proc.stderr[-3000:]}")
    r = json.loads(report.read_text())
    events = 0
    if traced:
        events = len(json.loads((tmp / "trace.json").read_text())["traceEvents"])
    return {"load": r["phases"]["load_seconds"], "read": r["phases"]["read_seconds"], "wall": wall,
            "events": events}


def step_costs() -> dict[str, float]:
    """Nanoseconds per instrumented step, measured here."""
    sys.path.insert(0, str(ROOT))
    from distload import trace
    from distload.loader.board import JobBoard
    from distload.loader.progress import RankProgress

    import torch.distributed as dist

    def span():
        with trace.span("read", "io", file="f", bytes=1):
            pass

    def nothing():
        pass

    n = 200_000
    call = timeit.timeit(nothing, number=n) / n * 1e9
    off = timeit.timeit(span, number=n) / n * 1e9
    trace.enable(max_events=n + 10)
    on = timeit.timeit(span, number=n) / n * 1e9
    trace.disable()
    plan = type("P", (), {"stage": lambda self, r: type("S", (), {"tensor_bytes": 1})()})()
    mine = RankProgress(JobBoard(dist.HashStore(), "b/", 1, 0), plan, 0)
    progress = timeit.timeit(lambda: mine("/ckpt/f", 1), number=n) / n * 1e9
    return {"empty_call_ns": call, "span_off_ns": off, "span_on_ns": on, "progress_call_ns": progress}


def main(argv=None) -> int:
    a = parse_args(argv)
    warm_cache(a.ckpt)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.warmup):      # imports, the page cache
            one_run(a, "off", Path(tmp))
        order = list(MODES)
        for i in range(a.repeats):   # each round starts with the next mode: no mode always last
            for mode in order[i % len(order):] + order[:i % len(order)]:
                runs[mode].append(one_run(a, mode, Path(tmp)))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("load", "read", "wall")}
           for m, rs in runs.items()}
    size = sum(f.stat().st_size for f in a.ckpt.glob("*.safetensors"))
    print(f"checkpoint {a.ckpt} ({size / 1e9:.2f} GB{', as ' + a.dtype if a.dtype else ''}), {a.nproc} ranks, medians of {a.repeats} runs "
          f"per mode, interleaved; load average {os.getloadavg()[0]:.1f}")
    for mode, m in med.items():
        ratio = {k: m[k] / med["off"][k] for k in m}
        extra = f"; {runs[mode][0]['events']} trace events" if MODES[mode][1] else ""
        print(f"{mode:<15} load {m['load']:.3f} s ({ratio['load']:.3f}x)  read {m['read']:.3f} s "
              f"({ratio['read']:.3f}x)  wall {m['wall']:.2f} s ({ratio['wall']:.3f}x){extra}")
    costs = step_costs()
    print(f"per step: trace.span off {costs['span_off_ns']:.0f} ns, on {costs['span_on_ns']:.0f} ns; "
          f"a reader progress call {costs['progress_call_ns']:.0f} ns (one per segment read, <= the staging size, or mapped chunk of <= 64 MiB); "
          f"an empty Python call here {costs['empty_call_ns']:.0f} ns")
    if a.json:
        a.json.write_text(json.dumps({"medians": med, "runs": runs, "steps": costs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
