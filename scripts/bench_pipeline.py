"""Pipeline throughput against sequential execution, on the CPU, in one run.

One `torchrun --nproc_per_node=2` job (one thread per rank) on a random-weight
checkpoint. Rank 0 also holds the whole model, and the timed calls alternate:

* pipeline: both ranks, forward in `--micro-batches` micro-batches (one call, and a
  stream of `--stream-batches` such batches through `forward_stream`, as a batch job
  runs), decoding with `--groups` sequence groups in flight;
* sequential: rank 0 alone, one thread, each whole batch through all layers in order
  (what a single-process device map does), while rank 1 waits idle in a barrier.

Timed calls alternate, and on Linux a call counts only if no other process used more
than 5% of a core meanwhile (from /proc/stat, less this job's own CPU time); disturbed
calls are retried, up to `--max-tries` times per figure, so a shared machine gives
the figures of its quiet moments. It prints forward and decode tokens/s (median of
`--repeats` undisturbed timed calls after a warm-up) and the pipeline / sequential
ratios. Decode tokens/s is
``batch * (N - 1) / (t(N new tokens) - t(1 new token))``: the prefill is taken out; it
is shown on its own (prompt tokens / t(1 new token)) and with the decode, end to end.

Sizes: with hidden 1024 every stage is compute-bound in the forward. Decoding a few rows
per step only streams the weights (memory-bound: a group of 16 rows on 4 layers takes
~60% of the time of 32 rows), and two groups in flight stream them twice, so the decode
batch is 128 (two groups of 64) to make the comparison one of compute. With P stages
and M equal micro-batches a forward call takes M + P - 1 stage-steps against M * P in
sequence: the printed bound P * M / (M + P - 1) is the best one GPipe forward call can
do. A stream fills and drains the pipeline once for all its batches, so its bound is P
(less the imbalance of the stages).

16 layers by default: a real model split over a few ranks puts many layers on each stage
(Llama-3-8B: 16 and 16 at two ranks, its head weighing ~2.4 layers, which the planner
balances by giving the last stage fewer), so the head is a small share of the last stage.
With 8 layers and whole layers per stage, the head alone makes the last stage ~9%
heavier, and the stream ratio drops by about as much (``--layers 8``).

Example::

    python scripts/bench_pipeline.py                       # hidden 1024, 16 layers, float32
    python scripts/bench_pipeline.py --micro-batches 4 8 --repeats 5 --json out.json
    python scripts/bench_pipeline.py --config scripts/configs/bench-qwen3-moe.json   # an MoE
    python scripts/bench_pipeline.py --check              # each ratio against its floor
    python scripts/bench_pipeline.py --stages traces/     # + each stage's busy/wait seconds

`--stages` traces one more call of each workload and prints each rank's busy and wait
seconds in it, the call against the same stages run in turn (same processes, so the
process-to-process spread of a core's speed, a few percent, does not enter) and the bound
the stages' balance allows: with a head on the last stage the stages are not equal, and
no schedule beats sum(busy) / (one micro-batch through every stage + the rest at the
slowest stage's pace). It also times one process cut as the pipeline cuts (the
same micro-batches, the same decode groups, one after the other) and prints what the cut
costs it against whole batches, and the pipeline against that process: smaller pieces make
smaller matrix products, which run fewer FLOP/s (on this bench's CPU, MKL's sgemm of a
1024-wide layer runs ~85 GFLOP/s on a 256-row micro-batch against ~96 on 1024 rows), and
two decode groups read every weight twice per step; the pipeline cannot win that back.

`--check` prints each ratio against its bound and its floor (a fraction of the bound,
`CHECK_FLOORS`, or `--floor KIND=FRACTION`) and exits 1 if a figure measured on a quiet
machine is below its floor, 2 if one is below but was measured among disturbed calls only
(no verdict: run it again on a quiet machine), 0 otherwise. A tool for people, not a timed
test: the floors hold on a quiet machine, not on a shared one, and at the default sizes
(a smaller model spends a larger share of each step in transfers: hidden 512 and 8 layers
gave 1.25 for one call on a loaded machine, from an undisturbed call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# --check's floors, as fractions of each workload's bound (`bounds`): the lowest of the
# quiet-machine figures of four runs at 8b1f0c5 (README: forward 1.48-1.50, stream 1.76-1.80,
# decode 1.59-1.71, prefill 1.65-1.68, generate 1.63-1.69 at the default sizes) less one
# run-to-run spread, so that a quiet run fails only on a loss larger than that noise.
CHECK_FLOORS = {"forward": 0.91, "stream": 0.86, "decode": 0.73, "prefill": 0.91, "generate": 0.78}
_EXIT_BELOW, _EXIT_NO_VERDICT = 1, 2


def _floor(text: str) -> tuple[str, float]:
    kind, _, value = text.partition("=")
    if kind not in (*CHECK_FLOORS, "all") or not value:
        raise argparse.ArgumentTypeError(f"--floor takes KIND=FRACTION with KIND one of "
                                         f"{', '.join(CHECK_FLOORS)} or all; got {text!r}")
    try:
        return kind, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--floor {text!r}: {value!r} is not a number") from None


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--config", help="a config.json of any built-in model type (e.g. "
                   "scripts/configs/bench-qwen3-moe.json); replaces the size flags above")
    p.add_argument("--batch", type=int, default=8, help="forward: sequences per call")
    p.add_argument("--seq", type=int, default=128, help="forward: tokens per sequence")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4],
                   help="forward micro-batches of the pipeline (several: one figure each)")
    p.add_argument("--stream-batches", type=int, default=8,
                   help="forward_stream: batches per timed stream (0: no stream figure)")
    p.add_argument("--decode-batch", type=int, default=128, help="decode: sequences per call")
    p.add_argument("--prompt", type=int, default=16, help="decode: prompt length")
    p.add_argument("--new-tokens", type=int, default=16, help="decode: tokens generated per sequence")
    p.add_argument("--groups", type=int, default=2, help="decode: sequence groups in flight")
    p.add_argument("--ranks", type=int, default=2, help="pipeline ranks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tries", type=int, default=20,
                   help="timed calls per figure at most, while others disturb them")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "distload-bench"))
    p.add_argument("--trace-overhead", action="store_true",
                   help="also time every pipelined call with distload.trace recording (as --trace "
                        "does), alternating with the plain calls, and print the ratios")
    p.add_argument("--stages", metavar="DIR", nargs="?", const="", default=None,
                   help="after the timings, trace one more call of each workload on every rank "
                        "and print each stage's busy and wait seconds, the pipeline against the "
                        "same stages run in turn, and the bound the stages' balance allows; also "
                        "time one process cut in the pipeline's micro-batches and groups; with "
                        "DIR, also write each call's Chrome/Perfetto trace there")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--check", action="store_true",
                   help="print each ratio against its bound and floor; exit 1 below a floor "
                        "(2: below, but measured among disturbed calls only)")
    p.add_argument("--floor", type=_floor, action="append", default=[], metavar="KIND=FRACTION",
                   help="--check's floor of KIND (forward, stream, decode, prefill, generate, "
                        "or all) as a fraction of its bound; repeatable")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(a) -> dict:
    if a.config:  # any registered architecture, its sizes from the file
        return {**json.loads(Path(a.config).read_text()), "torch_dtype": a.dtype}
    return {"model_type": "llama", "vocab_size": a.vocab, "hidden_size": a.hidden,
            "intermediate_size": a.intermediate or int(2.75 * a.hidden),
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": a.dtype}


def _checkpoint(a) -> Path:
    from distload.sources.demo import make_checkpoint

    cfg = _config(a)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(a.cache) / f"bench-{key}"
    if not path.is_dir():
        Path(a.cache).mkdir(parents=True, exist_ok=True)
        print(f"making checkpoint {path} ...", flush=True)
        make_checkpoint(cfg, path, num_shards=4, dtype=a.dtype, seed=0)
    return path


# ----------------------------------------------------------------------------- the job

def _whole_model(ckpt: str):
    """Rank 0's sequential baseline: the whole model in this process, as a world of one."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file

    from distload.dist import World
    from distload.meta import materialize
    from distload.models import build_model
    from distload.pipeline.pipe import Pipeline

    config = json.loads((Path(ckpt) / "config.json").read_text())
    with torch.device("meta"):
        model = build_model(config)
    materialize(model, "cpu")
    tensors = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        tensors.update(load_file(f))
    model.load_state_dict(tensors, strict=True, assign=True)
    plan = SimpleNamespace(config=config, dtype=config.get("torch_dtype"), stages=(),
                           activation_dtype=config.get("torch_dtype") or "float32")
    return Pipeline(module=model.eval(), plan=plan, report={}, job_report={},
                    world=World(0, 1, 0, torch.device("cpu"), None, nodes=(0,)))


class _Quiet:
    """Tells whether anything outside this job used the CPU during a timed call (Linux
    /proc; elsewhere every call counts)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.enabled = os.path.exists("/proc/stat")

    def _snapshot(self) -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        ours = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                ours += int(stat[11]) + int(stat[12])  # utime + stime
            except OSError:
                pass
        return busy, ours

    def measure(self, fn) -> tuple[float, bool]:
        """(seconds, undisturbed)"""
        before = self._snapshot() if self.enabled else None
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        if before is None:
            return seconds, True
        busy, ours = self._snapshot()
        others = (busy - before[0]) - (ours - before[1])
        return seconds, others <= 0.05 * seconds * self.hz + 2


def _job(a) -> None:
    """Every rank runs this; rank 0 writes the figures to --result."""
    import torch
    import torch.distributed as dist

    import distload
    from distload import trace
    from distload.pipeline.schedules.ring_decode import pipeline_generate

    torch.set_num_threads(1)
    pipe = distload.load(a.ckpt, device="cpu")
    world = pipe.world
    quiet = _Quiet(distload.dist.gather_objects(world, os.getpid()) + [os.getppid()])
    seq = _whole_model(a.ckpt) if world.rank == 0 else None
    gen = torch.Generator().manual_seed(0)
    vocab = _config(a)["vocab_size"]
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen)
    prompts = torch.randint(0, vocab, (a.decode_batch, a.prompt), generator=gen)

    def drain(stream) -> None:
        for _ in stream:
            pass

    def pipelined(kind, arg):
        if kind == "forward":
            return lambda: pipe.forward(ids, micro_batches=arg)
        if kind == "stream":
            batches = [ids] * a.stream_batches if world.rank == 0 else None
            return lambda: drain(pipe.forward_stream(batches, micro_batches=arg))
        return lambda: pipeline_generate(pipe, prompts, max_new_tokens=arg, micro_batches=a.groups,
                                         eos_token_id=[])

    def sequential(kind, arg):
        if kind == "forward":
            return lambda: seq.forward(ids, micro_batches=1)
        if kind == "stream":
            return lambda: drain(seq.forward_stream([ids] * a.stream_batches, micro_batches=1))
        return lambda: pipeline_generate(seq, prompts, max_new_tokens=arg, micro_batches=1,
                                         eos_token_id=[])

    def pieces(kind, arg):  # one process, cut as the pipeline cuts: its micro-batches or groups
        if kind == "forward":
            return lambda: seq.forward(ids, micro_batches=arg)
        if kind == "stream":
            return lambda: drain(seq.forward_stream([ids] * a.stream_batches, micro_batches=arg))
        return lambda: pipeline_generate(seq, prompts, max_new_tokens=arg, micro_batches=a.groups,
                                         eos_token_id=[])

    def traced(fn):
        def call():  # every rank records, as under --trace (the events are dropped after)
            trace.enable()
            try:
                fn()
            finally:
                trace.disable()
        return call

    def timed(fn, *, alone: bool) -> tuple[float, bool]:
        dist.barrier(group=world.cpu_group)
        if alone and world.rank != 0:  # rank 1 idles in the next barrier meanwhile
            return 0.0, True
        return quiet.measure(fn)

    cases = [("forward", m) for m in a.micro_batches]
    cases += [("stream", m) for m in a.micro_batches if a.stream_batches > 0]
    cases += [("generate", 1), ("generate", a.new_tokens)]
    for kind, arg in cases:  # warm-up
        timed(pipelined(kind, min(arg, 2)), alone=False)
        if world.rank == 0:
            sequential(kind, min(arg, 2))()
    roles_all = (["pipeline", "sequential"] + (["traced"] if a.trace_overhead else [])
                 + (["pieces"] if a.stages is not None else []))
    times: dict[str, dict[str, list[float]]] = {r: {} for r in roles_all}
    everything: dict[str, dict[str, list[float]]] = {r: {} for r in roles_all}
    disturbed = {r: 0 for r in roles_all}
    for kind, arg in cases:
        key = f"{kind}_{arg}"
        # the sequential forward does not depend on micro-batches: time it once
        roles = {"pipeline": (pipelined(kind, arg), False)}
        if a.trace_overhead:
            roles["traced"] = (traced(pipelined(kind, arg)), False)
        if kind not in ("forward", "stream") or arg == a.micro_batches[0]:
            roles["sequential"] = (sequential(kind, arg), True)
        if a.stages is not None:
            roles["pieces"] = (pieces(kind, arg), True)
        for role in roles:
            times[role].setdefault(key, [])
        for attempt in range(a.max_tries):
            # rank 0 keeps the count; every rank follows its list of what still needs calls
            need = [r for r in roles if len(times[r][key]) < a.repeats]
            need = distload.dist.gather_objects(world, need)[0]
            if not need:
                break
            # each round starts with the next role, so that every role takes every place
            turn = attempt % len(need)
            for role in need[turn:] + need[:turn]:
                fn, alone = roles[role]
                seconds, ok = timed(fn, alone=alone)
                if world.rank == 0:
                    everything[role].setdefault(key, []).append(seconds)
                    if ok:
                        times[role][key].append(seconds)
                    else:
                        disturbed[role] += 1
    stages = {} if a.stages is None else {
        f"{kind}_{arg}": _stage_figures(world, pipelined(kind, arg), a.stages, f"{kind}_{arg}")
        for kind, arg in cases if (kind, arg) != ("generate", 1)}
    dist.barrier(group=world.cpu_group)
    if world.rank == 0:
        Path(a.result).write_text(json.dumps({
            "times": times, "all_times": everything, "disturbed_calls": disturbed, "load_average": os.getloadavg(),
            "stages": [list(s.units) for s in pipe.plan.stages], "stage_figures": stages}))
    distload.dist.shutdown(world)


# what a stage's trace spans mean: its own compute, or waiting on a peer
_BUSY_SPANS = ("forward", "prefill", "decode step")
_WAIT_SPANS = ("recv wait", "send wait")


def _stage_figures(world, fn, out_dir: str, name: str) -> list[dict] | None:
    """Every rank: one traced call of `fn`; rank 0 gets each rank's seconds busy (its
    stage's compute spans), waiting (receives and sends) and in the call, and writes the
    call's Chrome trace to `out_dir` if given (one track per rank)."""
    import torch.distributed as dist

    from distload import trace
    from distload.dist import gather_objects
    from distload.loader.tracing import write_job_trace

    dist.barrier(group=world.cpu_group)
    trace.enable()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    spans: dict[str, float] = {}
    for name_, _cat, phase, _start, dur, *_ in (trace.snapshot() or trace.Recording()).events:
        if phase == "X":
            spans[name_] = spans.get(name_, 0.0) + dur / 1e6
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_job_trace(world, Path(out_dir) / f"{name}.json")
    trace.disable()
    mine = {"call": seconds, "busy": sum(spans.get(k, 0.0) for k in _BUSY_SPANS),
            "wait": sum(spans.get(k, 0.0) for k in _WAIT_SPANS)}
    rows = gather_objects(world, mine)
    return rows if world.rank == 0 else None


def stage_balance(rows: list[dict], items: int) -> dict:
    """From one traced call's per-rank busy seconds over `items` equal work items
    (micro-batches through the stages): the call against the same stages run in turn
    (``in_turn``: sum of busy / the call, what a multi-device map does with the same
    processes, so no process-to-process noise enters), the bound the stages' balance
    allows (``balance_bound``: sum of busy / (one item through every stage + the other
    items at the slowest stage's pace), the GPipe bound for unequal stages) and how
    close the call came to that (``schedule_efficiency``)."""
    busy = [r["busy"] for r in rows]
    call = max(r["call"] for r in rows)
    ideal = sum(busy) / items + (items - 1) * max(busy) / items
    return {"in_turn": sum(busy) / call, "balance_bound": sum(busy) / ideal,
            "schedule_efficiency": ideal / call,
            "imbalance": max(busy) / (sum(busy) / len(busy)) - 1}


def _decode_tok_s(decoded: int, seconds: float) -> float | None:
    """None where t(N) <= t(1): on a tiny model the decode is smaller than the noise."""
    return decoded / seconds if seconds > 0 else None


def _ratio(pipeline: float | None, sequential: float | None) -> float | None:
    return None if pipeline is None or sequential is None else pipeline / sequential


def _figures(a, raw: dict) -> dict:
    # undisturbed calls; where there were none, every call (the printout says how many)
    med = {role: {k: statistics.median(v or raw["all_times"][role][k]) for k, v in t.items()}
           for role, t in raw["times"].items()}
    tokens = a.batch * a.seq
    decoded = a.decode_batch * (a.new_tokens - 1)
    out = {}
    for role, m in med.items():
        out[role] = {
            "forward_tok_s": {mb: tokens / m[f"forward_{mb}"] for mb in a.micro_batches
                              if f"forward_{mb}" in m},
            "stream_tok_s": {mb: a.stream_batches * tokens / m[f"stream_{mb}"]
                             for mb in a.micro_batches if f"stream_{mb}" in m},
            "decode_tok_s": _decode_tok_s(decoded, m[f"generate_{a.new_tokens}"] - m["generate_1"]),
            "prefill_tok_s": a.decode_batch * a.prompt / m["generate_1"],
            "generate_tok_s": a.decode_batch * a.new_tokens / m[f"generate_{a.new_tokens}"],
        }
    first = a.micro_batches[0]
    for kind in ("forward", "stream"):
        seq_tok_s = out["sequential"][f"{kind}_tok_s"].get(first)
        out[f"{kind}_ratio"] = {mb: v / seq_tok_s
                                for mb, v in out["pipeline"][f"{kind}_tok_s"].items()}
    for kind in ("decode", "prefill", "generate"):
        out[f"{kind}_ratio"] = _ratio(out["pipeline"][f"{kind}_tok_s"], out["sequential"][f"{kind}_tok_s"])
    if "pieces" in out:  # --stages: what cutting the batch costs one process, and the rest
        out["pieces_speed"], out["pieces_ratio"] = {}, {}
        for kind, mb in _workloads(a):
            name, get = (kind, lambda role: out[role][f"{kind}_tok_s"]) if mb is None else \
                (f"{kind}_{mb}", lambda role: out[role][f"{kind}_tok_s"].get(mb))
            whole = out["sequential"][f"{kind}_tok_s"]
            whole = whole.get(first) if mb is not None else whole
            out["pieces_speed"][name] = _ratio(get("pieces"), whole)
            out["pieces_ratio"][name] = _ratio(get("pipeline"), get("pieces"))
    return out


def _workloads(a) -> list[tuple[str, int | None]]:
    """(kind, micro-batches) of every ratio the bench prints; None: decoding's groups."""
    return ([(k, mb) for k in ("forward", "stream") for mb in a.micro_batches
             if k == "forward" or a.stream_batches > 0]
            + [(k, None) for k in ("decode", "prefill", "generate")])


def bounds(a) -> dict:
    """The best ratio each workload can reach with `a.ranks` equal stages: one GPipe call
    P * M / (M + P - 1); a stream P; decoding and generating min(groups, P) (a stage idles
    without a group to run); the prefill, in `prefill_parts` pieces per group, fills and
    drains once: P * n / (n + P - 1) for its n pieces."""
    from distload.pipeline.microbatch import prefill_parts, split_sizes

    p = a.ranks
    groups = split_sizes(a.decode_batch, a.groups)
    pieces = sum(prefill_parts(p, len(groups), rows) for rows in groups)
    return {"forward": {m: p * m / (m + p - 1) for m in a.micro_batches},
            "stream": {m: float(p) for m in a.micro_batches},
            "decode": float(min(len(groups), p)), "prefill": p * pieces / (pieces + p - 1),
            "generate": float(min(len(groups), p))}


def _keys(a, kind: str, mb: int | None) -> list[tuple[str, str]]:
    """The (role, timed key) pairs a ratio is made of."""
    if kind in ("forward", "stream"):
        return [("pipeline", f"{kind}_{mb}"), ("sequential", f"{kind}_{a.micro_batches[0]}")]
    keys = {"decode": ["generate_1", f"generate_{a.new_tokens}"], "prefill": ["generate_1"],
            "generate": [f"generate_{a.new_tokens}"]}[kind]
    return [(role, k) for role in ("pipeline", "sequential") for k in keys]


def check(a, fig: dict, raw: dict, floors: dict[str, float]) -> tuple[list[str], int]:
    """--check: one line per ratio (ratio, bound, ratio / bound, floor) and the exit
    status: 1 if a ratio measured from undisturbed calls only is below its floor, 2 if
    one below it had no undisturbed call to go on (no verdict), else 0."""
    lines, failed, no_verdict, limits = [], False, False, bounds(a)
    items = [(k, mb, fig[f"{k}_ratio"][mb], limits[k][mb]) for k in ("forward", "stream")
             for mb in fig[f"{k}_ratio"]]
    items += [(k, None, fig[f"{k}_ratio"], limits[k]) for k in ("decode", "prefill", "generate")]
    for kind, mb, ratio, bound in items:
        name = kind if mb is None else f"{kind} x {mb}"
        floor = floors[kind]
        if ratio is None:
            lines.append(f"check {name:<12} not measurable (the decode is within the noise): "
                         f"no verdict")
            no_verdict |= floor > 0
            continue
        quiet = all(raw["times"][role].get(key) for role, key in _keys(a, kind, mb))
        below = ratio < floor * bound
        verdict = "ok" if not below else ("BELOW" if quiet else "below, but disturbed: no verdict")
        failed |= below and quiet
        no_verdict |= below and not quiet
        lines.append(f"check {name:<12} {ratio:5.2f} of bound {bound:4.2f} = {ratio / bound:5.1%} "
                     f"(floor {floor:.0%}{'' if quiet else ', disturbed calls only'}): {verdict}")
    return lines, _EXIT_BELOW if failed else _EXIT_NO_VERDICT if no_verdict else 0


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        _job(a)
        return 0
    ckpt = _checkpoint(a)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = []
        for k, v in vars(a).items():
            if v is None or v is False or k in ("worker", "ckpt", "result", "json", "ranks",
                                                      "check", "floor"):
                continue
            argv += [f"--{k.replace('_', '-')}"]
            if v is not True:
                argv += list(map(str, v if isinstance(v, list) else [v]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={a.ranks}", os.path.abspath(__file__), *argv, "--worker",
               "--ckpt", str(ckpt), "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        raw = json.loads(result.read_text())
    fig = _figures(a, raw)
    p, seq, pipe = a.ranks, fig["sequential"], fig["pipeline"]
    cfg = _config(a)
    print(f"model: {cfg['model_type']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vocab {cfg['vocab_size']}, {a.dtype}; stage units "
          f"{[len(s) for s in raw['stages']]}; load average at the end {raw['load_average'][0]:.1f}")
    counts = {role: min(len(v) for v in t.values()) for role, t in raw["times"].items()}
    print(f"medians of >= {counts} undisturbed calls per figure; calls retried because another "
          f"process used the CPU: {raw['disturbed_calls']}")
    seq_fwd = seq["forward_tok_s"][a.micro_batches[0]]
    for m, tok_s in pipe["forward_tok_s"].items():
        print(f"forward  batch {a.batch} x {a.seq}: sequential {seq_fwd:8.1f} tok/s | pipeline {p} "
              f"ranks x {m} micro-batches {tok_s:8.1f} tok/s | ratio {fig['forward_ratio'][m]:.2f} "
              f"(GPipe bound {p * m / (m + p - 1):.2f})")
    for m, tok_s in pipe["stream_tok_s"].items():
        seq_stream = seq["stream_tok_s"][a.micro_batches[0]]
        print(f"stream   {a.stream_batches} batches of {a.batch} x {a.seq}: sequential "
              f"{seq_stream:8.1f} tok/s | pipeline {p} ranks x {m} micro-batches {tok_s:8.1f} tok/s "
              f"| ratio {fig['stream_ratio'][m]:.2f} (bound {p:.2f})")
    if fig["decode_ratio"] is None:
        print(f"decode   batch {a.decode_batch}, {a.new_tokens} new tokens: not measurable, "
              f"t({a.new_tokens} new tokens) <= t(1 new token) (the decode is within the noise)")
    else:
        print(f"decode   batch {a.decode_batch}, {a.new_tokens} new tokens: sequential "
              f"{seq['decode_tok_s']:8.1f} tok/s | pipeline {p} ranks x {a.groups} groups "
              f"{pipe['decode_tok_s']:8.1f} tok/s | ratio {fig['decode_ratio']:.2f}")
    print(f"prefill  batch {a.decode_batch} x {a.prompt} (+ 1 token): sequential "
          f"{seq['prefill_tok_s']:8.1f} tok/s | pipeline {p} ranks x {a.groups} groups "
          f"{pipe['prefill_tok_s']:8.1f} tok/s | ratio {fig['prefill_ratio']:.2f}")
    print(f"generate end to end, {a.new_tokens} new tokens: sequential {seq['generate_tok_s']:8.1f} "
          f"new tok/s | pipeline {pipe['generate_tok_s']:8.1f} new tok/s | ratio "
          f"{fig['generate_ratio']:.2f}")
    for key, rows in raw.get("stage_figures", {}).items():
        kind, arg = key.rsplit("_", 1)
        items = {"forward": int(arg), "stream": int(arg) * a.stream_batches}.get(kind)
        per_rank = " | ".join(f"rank {r}: busy {row['busy']:.3f} s, waits {row['wait']:.3f} s"
                              for r, row in enumerate(rows))
        print(f"stages   {key:<12} one traced call of {rows[0]['call']:.3f} s: {per_rank}")
        if items:  # the forwards: every stage runs `items` equal micro-batches
            b = stage_balance(rows, items)
            print(f"         against the same stages in turn {b['in_turn']:.2f}; the stages' "
                  f"balance (slowest {b['imbalance']:+.1%} on the mean) allows "
                  f"{b['balance_bound']:.2f}; the schedule reached {b['schedule_efficiency']:.1%} of it")
        else:
            total = sum(r["busy"] for r in rows)
            print(f"         against the same stages in turn {total / max(r['call'] for r in rows):.2f}")
    if "pieces_speed" in fig:
        limits = bounds(a)
        speed = ", ".join(f"{k.replace('_', ' x ')} {'-' if v is None else f'{v:.2f}'}"
                          for k, v in fig["pieces_speed"].items())
        print(f"pieces   one process cut as the pipeline cuts (its micro-batches, its {a.groups} "
              f"decode groups), tokens/s against whole batches: {speed}")
        parts = []
        for kind, mb in _workloads(a):
            v = fig["pieces_ratio"][kind if mb is None else f"{kind}_{mb}"]
            bound = limits[kind] if mb is None else limits[kind][mb]
            parts.append(f"{kind if mb is None else f'{kind} x {mb}'} "
                         f"{'-' if v is None else f'{v:.2f}'} (bound {bound:.2f})")
        print(f"         the pipeline against that process: {', '.join(parts)}")
    if a.trace_overhead:
        traced = fig["traced"]
        parts = [f"forward {traced['forward_tok_s'][m] / pipe['forward_tok_s'][m]:.3f}"
                 for m in pipe["forward_tok_s"]]
        parts += [f"stream {traced['stream_tok_s'][m] / pipe['stream_tok_s'][m]:.3f}"
                  for m in pipe["stream_tok_s"]]
        parts += [f"{kind} {traced[f'{kind}_tok_s'] / pipe[f'{kind}_tok_s']:.3f}"
                  for kind in ("decode", "prefill", "generate")
                  if traced[f"{kind}_tok_s"] and pipe[f"{kind}_tok_s"]]
        print(f"with tracing on, tokens/s relative to off (pipeline, same run): {', '.join(parts)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"figures": fig, "raw": raw, "args": vars(a)}, indent=1))
    if a.check:
        floors = dict(CHECK_FLOORS)
        for kind, value in a.floor:
            floors.update(dict.fromkeys(CHECK_FLOORS, value) if kind == "all" else {kind: value})
        lines, status = check(a, fig, raw, floors)
        print("\n".join(lines))
        print({0: "check: every ratio at or above its floor", _EXIT_BELOW: "check: FAILED",
               _EXIT_NO_VERDICT: "check: no verdict (disturbed or unmeasurable figures; "
                                 "run it on a quiet machine)"}[status])
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
