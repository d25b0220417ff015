"""Load-time benchmark: distload against PyTorch DCP, accelerate and a raw read, in one run.

Each system loads the same checkpoint on `--nproc` CPU ranks under torchrun, every run in
a fresh torchrun (so no system's memory or warm-up leaks into another's), `--repeats`
times, interleaved (distload, dcp, accelerate, raw, distload, ...):

* distload:   `distload.load(CKPT, device="cpu")`; load seconds = its report's
              ``load_seconds`` (wall = the whole call, planning and rendezvous included);
* dcp:        `torch.distributed.checkpoint.load` of each rank's distload-stage keys with
              `HuggingFaceStorageReader(CKPT)`, ``no_dist=True``;
* accelerate: each rank builds the model on meta (transformers) and runs
              `load_checkpoint_and_dispatch(model, CKPT, device_map={"": "cpu"})`: the whole
              model on every rank, as users run it under torchrun today;
* raw:        `readinto` of each rank's stage byte ranges into one buffer per tensor.

Per system and rank it prints the median load seconds, bytes read (distload: its own
counter; the others: the /proc/self/io ``rchar`` delta, which cannot see reads through a
memory map: dcp and accelerate read through safetensors' mmap), the tensor bytes each
materialized, the peak growth of private memory (USS) and of RSS. USS is sampled every
10 ms in `--memory-runs` extra runs per system (sampling it walks the page tables and
slows a load on a small machine by ~40%, so the timed runs only sample cheap RSS
counters). The "bytes in" of the ratios is max(bytes read, tensor bytes materialized): a
system cannot have used fewer bytes of the file than it materialized. Then distload's
ratios to each peer and the three figures of issue 2, PASS or FAIL:

  (a) bytes read per rank <= 1.01 x its tensor bytes (+ headers), summed = checkpoint
      tensor bytes +-1% (every distload run);
  (b) peak USS growth per rank <= its stage bytes + 128 MiB (every distload memory run);
  (c) warm distload load seconds <= 0.5 x dcp's (median over repeats of the slowest rank).

Warm page cache: the checkpoint is read once before the warm runs. ``--cold``: caches are
dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every cold run, when that
file is writable (else the cold runs are skipped, and the output says so).

``--staged`` measures something else: distload's staged read path forced on the CPU (the
GPU path minus the copy to the device) against a raw, dd-like read of the same bytes, for
``--threads`` and with and without O_DIRECT, warm and (``--cold``, by
`posix_fadvise(DONTNEED)`, no root needed) cold; see `scripts/_bench_staged.py`.

Example::

    python scripts/make_checkpoint.py /tmp/bench-ckpt --preset 1.4gb
    python scripts/bench_load.py /tmp/bench-ckpt --nproc 2 --repeats 3 --cold --json out.json
    python scripts/bench_load.py /tmp/bench-ckpt --nproc 2 --staged --cold --threads 1,2,4,8
    python scripts/bench_load.py /tmp/bench-ckpt --nproc 2 --model s3://bench/ckpt   # object store
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_bench_load_worker.py"
SYSTEMS = ("distload", "dcp", "accelerate", "raw")
PEERS = ("dcp", "accelerate", "raw")
DROP_CACHES = "/proc/sys/vm/drop_caches"
MB = 1e6
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path, help="checkpoint directory (HF safetensors)")
    p.add_argument("--model", help="s3://BUCKET/PREFIX: upload CKPT there on a local S3 server and compare "
                                   "loading from it with downloads (scripts/_bench_s3.py)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per system and mode (default 3)")
    p.add_argument("--cold", action="store_true", help="also run with the page cache dropped")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--memory-runs", type=int, default=1,
                   help="extra runs per system and mode that sample USS (default 1; 0: sample "
                        "it in the timed runs, which it slows)")
    p.add_argument("--interval-ms", type=float, default=10.0, help="memory sampling period")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per torchrun")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--staged", action="store_true",
                   help="benchmark the staged read path (forced on the CPU) against a raw read instead")
    p.add_argument("--threads", default="1,2,4,8", help="--staged: reader thread counts (default 1,2,4,8)")
    p.add_argument("--direct", default="off,on", help="--staged: O_DIRECT settings to run (default off,on)")
    p.add_argument("--staging-size", default="16MiB", help="--staged: read and staging buffer size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="--staged: destinations on the CPU (the staged path forced) or on each "
                        "rank's GPU (the real GPU path)")
    a = p.parse_args(argv)
    try:
        a.staging_bytes = _parse_size(a.staging_size)
    except ValueError as e:
        p.error(str(e))
    a.systems = tuple(s for s in a.systems.split(",") if s)
    bad = set(a.systems) - set(SYSTEMS)
    if bad or "distload" not in a.systems:
        p.error(f"--systems must include distload and name only {', '.join(SYSTEMS)}; got {a.systems}")
    if a.repeats < 1 or a.nproc < 1 or a.memory_runs < 0:
        p.error("--repeats and --nproc must be >= 1, --memory-runs >= 0")
    if not (a.ckpt / "config.json").is_file():
        p.error(f"{a.ckpt} is not a checkpoint directory with a config.json")
    return a


# ----------------------------------------------------------------------------- checkpoint

def safetensors_layout(ckpt: Path) -> dict[str, dict]:
    """file -> {"header": bytes of the 8-byte length + JSON header, "tensor": tensor bytes},
    parsed here independently of distload."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        tensors = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        out[f.name] = {"header": 8 + n, "tensor": sum(e - b for b, e in tensors)}  # as plans name it
    return out


def make_plan(ckpt: Path, nproc: int, path: Path):
    """The distload plan for `nproc` ranks (as rank 0 would compute it), written for the
    workers: dcp and raw load exactly these stages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's distload, as the workers get it
    from distload.loader.prepare import PlanRequest, plan_load

    plan = plan_load(PlanRequest(model=str(ckpt), world_size=nproc))
    path.write_text(plan.to_json())
    return plan


def warm_cache(ckpt: Path) -> None:
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def drop_caches() -> bool:
    """sync; echo 3 > drop_caches. False when not allowed."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- running

def cpu_seconds() -> dict:
    """CPU seconds so far: the whole machine's busy time and steal (/proc/stat), and this
    process's own plus its waited-for descendants' (every torchrun and its ranks)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"machine": (user + nice + system + irq + softirq) / hz, "steal": steal / hz,
            "ours": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "wall": time.perf_counter()}


def run_system(a, system: str, plan_path: Path, tmp: Path, *, uss: bool = False) -> list[dict]:
    """One fresh torchrun of `system`; returns one result dict per rank (rank order), each
    with the machine's 1-minute load average before the run. `uss`: a memory run."""
    out = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=tmp))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(WORKER), f"--system={system}", f"--ckpt={a.ckpt.resolve()}", f"--plan={plan_path}",
           f"--out={out}", f"--interval-ms={a.interval_ms}"] + (["--uss"] if uss else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{tail}")
    return [{**json.loads((out / f"rank{r}.json").read_text()), "loadavg_before": load}
            for r in range(a.nproc)]


def run_all(a, plan_path: Path, tmp: Path, modes: list[str]) -> dict:
    """Per mode: `a.repeats` timed runs of every system, interleaved, then `a.memory_runs`
    memory runs (USS sampled). Returns {"runs"|"memory_runs": mode -> system -> list over
    runs of per-rank results, "errors": mode -> system -> message}."""
    runs: dict = {m: {s: [] for s in a.systems} for m in modes}
    memory: dict = {m: {s: [] for s in a.systems} for m in modes}
    errors: dict = {}
    for mode in modes:
        if mode == "warm":
            warm_cache(a.ckpt)
        # --memory-runs 0: the timed runs sample USS themselves (quicker, slower loads).
        timed_uss = a.memory_runs == 0
        plan = [(f"{rep + 1}/{a.repeats}", timed_uss, True) for rep in range(a.repeats)]
        plan += [(f"memory {k + 1}/{a.memory_runs}", True, False) for k in range(a.memory_runs)]
        for label, uss, timed in plan:
            for system in a.systems:
                if system in errors.get(mode, {}):
                    continue
                if mode == "cold":
                    drop_caches()
                try:
                    ranks = run_system(a, system, plan_path, tmp, uss=uss)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    errors.setdefault(mode, {})[system] = str(e)
                    print(f"[{mode} {label}] {system}: FAILED\n{e}", flush=True)
                    continue
                if timed:
                    runs[mode][system].append(ranks)
                if uss:
                    memory[mode][system].append(ranks)
                what = ("load s", "seconds", 1) if timed else ("peak USS+ MB", "uss_growth", MB)
                print(f"[{mode} {label}] {system:<10} {what[0]} per rank: "
                      + " ".join(f"{r[what[1]] / what[2]:.3f}" for r in ranks), flush=True)
    return {"runs": runs, "memory_runs": memory, "errors": errors}


# ----------------------------------------------------------------------------- summary

def bytes_read(system: str, r: dict) -> int:
    return r["bytes_read"] if system == "distload" else r["rchar"]


def summarize(system: str, repeats: list[list[dict]], memory: list[list[dict]], nproc: int) -> dict:
    """Per rank medians over repeats, and the job: the slowest rank's seconds, sums of
    bytes and memory over ranks (each the median over repeats). USS growth comes from the
    memory runs; the rest from the timed runs."""
    med = statistics.median
    ranks = []
    for r in range(nproc):
        rows = [rep[r] for rep in repeats]
        uss = [rep[r]["uss_growth"] for rep in memory] or [0]
        ranks.append({
            "rank": r,
            "seconds": med(x["seconds"] for x in rows),
            "wall_seconds": med(x.get("wall_seconds", x["seconds"]) for x in rows),
            "bytes_read": med(bytes_read(system, x) for x in rows),
            "rchar": med(x["rchar"] for x in rows),
            "materialized": med(x["materialized"] for x in rows),
            "uss_growth": med(uss),
            "uss_growth_max": max(uss),
            "rss_growth": med(x["rss_growth"] for x in rows),
            "anon_growth": med(x["anon_growth"] for x in rows),
            "bytes_read_max": max(bytes_read(system, x) for x in rows),
            "runs": len(rows),
        })
    job = {
        "seconds": med(max(x["seconds"] for x in rep) for rep in repeats),
        "wall_seconds": med(max(x.get("wall_seconds", x["seconds"]) for x in rep) for rep in repeats),
        "bytes_read": med(sum(bytes_read(system, x) for x in rep) for rep in repeats),
        "materialized": med(sum(x["materialized"] for x in rep) for rep in repeats),
        "uss_growth": med([sum(x["uss_growth"] for x in rep) for rep in memory] or [0]),
        "rss_growth": med(sum(x["rss_growth"] for x in rep) for rep in repeats),
        "anon_growth": med(sum(x["anon_growth"] for x in rep) for rep in repeats),
    }
    job["bytes_in"] = max(job["bytes_read"], job["materialized"])
    if all("first_touch_seconds" in x for rep in repeats for x in rep):
        job["first_touch_seconds"] = med(max(x["first_touch_seconds"] for x in rep) for rep in repeats)
    return {"ranks": ranks, "job": job}


def ratios(summary: dict) -> dict:
    """distload / peer for time (slowest rank), bytes in and USS growth (sums over ranks)."""
    if "distload" not in summary:
        return {}
    d = summary["distload"]["job"]
    out = {}
    for peer in PEERS:
        if peer in summary:
            p = summary[peer]["job"]
            out[peer] = {"time": _div(d["seconds"], p["seconds"]),
                         "bytes": _div(d["bytes_in"], p["bytes_in"]),
                         "memory": _div(d["uss_growth"], p["uss_growth"]),
                         "rss": _div(d["rss_growth"], p["rss_growth"])}
    return out


def _div(x: float, y: float) -> float | None:
    return x / y if y else None


VIA = {"distload": "counter", "dcp": "rchar*", "accelerate": "rchar*", "raw": "rchar"}


def format_table(summary: dict, stage_bytes: list[int]) -> str:
    head = (f"{'system':<10} {'rank':>4} {'load s':>8} {'wall s':>8} {'read MB':>9} {'via':<8} "
            f"{'tensor MB':>10} {'stage MB':>9} {'USS+ MB':>8} {'RSS+ MB':>8}")

    def row(system: str, rank, r: dict, stage: int) -> str:
        return (f"{system:<10} {rank:>4} {r['seconds']:>8.3f} {r['wall_seconds']:>8.3f} "
                f"{r['bytes_read'] / MB:>9.1f} {VIA[system]:<8} {r['materialized'] / MB:>10.1f} "
                f"{stage / MB:>9.1f} {r['uss_growth'] / MB:>8.1f} {r['rss_growth'] / MB:>8.1f}")

    lines = [head, "-" * len(head)]
    for system, s in summary.items():
        lines += [row(system, r["rank"], r, stage_bytes[r["rank"]]) for r in s["ranks"]]
        lines.append(row(system, "all", s["job"], sum(stage_bytes)))
    return "\n".join(lines)


def format_ratios(rat: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.2f}x"
    return "\n".join(f"distload / {peer:<10}: time {f(r['time'])}, bytes in {f(r['bytes'])}, "
                     f"USS growth {f(r['memory'])}, RSS growth {f(r['rss'])}" for peer, r in rat.items())


# ----------------------------------------------------------------------------- figures

def check_figures(result: dict, plan, layout: dict) -> list[dict]:
    """The issue's three figures, from distload's runs (a, b: every run of every mode;
    c: the warm medians)."""
    ckpt_bytes = sum(v["tensor"] for v in layout.values())
    figures = []
    dl_runs = [rep for mode in result["runs"].values() for rep in mode.get("distload", [])]
    dl_memory = [rep for mode in result["memory_runs"].values() for rep in mode.get("distload", [])]

    worst, ok = [], bool(dl_runs)
    for rank, stage in enumerate(plan.stages):
        headers = sum(layout[f]["header"] for f in {m.file for m in stage.reads})
        limit = 1.01 * stage.tensor_bytes + headers
        got = max((rep[rank]["bytes_read"] for rep in dl_runs), default=0)
        ok &= got <= limit
        worst.append(f"rank {rank} {got / MB:.1f} MB <= {limit / MB:.1f} MB")
    sums = [sum(r["bytes_read"] for r in rep) for rep in dl_runs]
    sum_ok = bool(sums) and all(abs(s - ckpt_bytes) <= 0.01 * ckpt_bytes for s in sums)
    figures.append({"name": "a", "pass": ok and sum_ok,
                    "text": f"bytes read per rank ({'; '.join(worst)}); summed "
                            f"{min(sums, default=0) / MB:.1f}..{max(sums, default=0) / MB:.1f} MB vs "
                            f"checkpoint tensor bytes {ckpt_bytes / MB:.1f} MB +-1%"})

    parts, ok = [], bool(dl_memory)
    for rank, stage in enumerate(plan.stages):
        limit = stage.tensor_bytes + 128 * MIB
        got = max((rep[rank]["uss_growth"] for rep in dl_memory), default=0)
        ok &= got <= limit
        parts.append(f"rank {rank} {got / MB:.1f} MB <= {limit / MB:.1f} MB")
    figures.append({"name": "b", "pass": ok,
                    "text": f"peak USS growth, worst memory run ({'; '.join(parts)})"})

    warm = result["summary"].get("warm", {})
    if "distload" in warm and "dcp" in warm:
        d, p = warm["distload"]["job"]["seconds"], warm["dcp"]["job"]["seconds"]
        figures.append({"name": "c", "pass": d <= 0.5 * p,
                        "text": f"warm load {d:.3f} s <= 0.5 x dcp {p:.3f} s = {0.5 * p:.3f} s "
                                f"(ratio {d / p:.2f})"})
    else:
        figures.append({"name": "c", "pass": False, "text": "no warm distload and dcp runs to compare"})
    return figures


def machine_note(before: dict) -> dict:
    """How much CPU other processes took while the benchmark ran: they skew every timing."""
    after = cpu_seconds()
    wall = after["wall"] - before["wall"]
    cpus = os.cpu_count() or 1
    others = max(0.0, (after["machine"] - before["machine"]) - (after["ours"] - before["ours"]))
    steal = after["steal"] - before["steal"]
    share = others / (wall * cpus)
    text = (f"machine: {cpus} CPUs; while the benchmark ran ({wall:.0f} s) other processes used "
            f"{others:.0f} CPU-s ({100 * share:.0f}% of the machine), hypervisor steal {steal:.0f} CPU-s")
    busy = share > 0.05
    if busy:
        text += ("\nWARNING: other processes competed for the CPUs: timings are noisy; "
                 "rerun on a quiet machine")
    return {"cpus": cpus, "wall": wall, "other_cpu_seconds": others, "other_share": share,
            "steal_seconds": steal, "busy": busy, "text": text}


# ----------------------------------------------------------------------------- main

def _parse_size(text: str) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from distload.plan.budget import parse_size

    return parse_size(text)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.model:
        if not a.model.startswith("s3://"):
            raise SystemExit("--model takes an s3://BUCKET/PREFIX URL")
        from _bench_s3 import s3_main

        return s3_main(a)
    if a.staged:
        from _bench_staged import staged_main

        return staged_main(a, make_plan, machine_note, cpu_seconds)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    layout = safetensors_layout(a.ckpt)
    modes = ["warm"]
    cold_note = "not asked (--cold)"
    if a.cold:
        if os.access(DROP_CACHES, os.W_OK) and drop_caches():
            modes.append("cold")
            cold_note = f"caches dropped before each cold run via {DROP_CACHES}"
        else:
            cold_note = f"{DROP_CACHES} is not writable: cold runs skipped"
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan = make_plan(a.ckpt, a.nproc, plan_path)
        stage_bytes = [s.tensor_bytes for s in plan.stages]
        print(f"checkpoint {a.ckpt}: {len(layout)} files, "
              f"{sum(v['tensor'] for v in layout.values()) / MB:.1f} MB of tensors; {a.nproc} ranks, "
              f"stages {', '.join(f'{b / MB:.1f} MB' for b in stage_bytes)}; {a.repeats} repeat(s); "
              f"cold: {cold_note}", flush=True)
        result = run_all(a, plan_path, Path(tmp), modes)

    result["summary"] = {m: {s: summarize(s, reps, result["memory_runs"][m][s], a.nproc)
                             for s, reps in by.items() if reps}
                         for m, by in result["runs"].items()}
    result["ratios"] = {m: ratios(s) for m, s in result["summary"].items()}
    mismatched = [m for m, by in result["runs"].items() for rep in by.get("distload", [])
                  for r in rep if not r.get("plan_matches", True)]
    for mode in modes:
        print(f"\n== {mode} page cache (medians of {a.repeats}; 'all' = slowest rank's seconds, sums "
              f"over ranks) ==")
        print(format_table(result["summary"][mode], stage_bytes))
        print(format_ratios(result["ratios"][mode]))
        touch = result["summary"][mode].get("accelerate", {}).get("job", {}).get("first_touch_seconds")
        if touch is not None:
            print(f"accelerate's weights are views of the files' mappings, not read during its load: "
                  f"touching every page afterwards took {touch:.3f} s more")
    print("* rchar cannot see reads through a memory map (safetensors mmaps the files): for dcp and "
          "accelerate, 'tensor MB' is the floor of what they read.\n  USS+ = private memory; "
          "RSS+ also counts mapped file pages: accelerate's weights stay views of the page cache "
          "shared by all ranks (RSS, not USS).")
    if mismatched:
        print(f"WARNING: distload's own plan differed from the benchmark's in {mismatched}: "
              "dcp/raw loaded other stages")
    figures = check_figures(result, plan, layout)
    result["machine"] = machine_note(cpu0)
    print(result["machine"]["text"])
    print()
    for f in figures:
        print(f"figure ({f['name']}): {'PASS' if f['pass'] else 'FAIL'}: {f['text']}")
    seconds = time.perf_counter() - start
    print(f"benchmark took {seconds:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({
            "checkpoint": str(a.ckpt), "nproc": a.nproc, "repeats": a.repeats, "modes": modes,
            "cold": cold_note, "stage_bytes": stage_bytes, "checkpoint_tensor_bytes":
            sum(v["tensor"] for v in layout.values()), "figures": figures, "seconds": seconds,
            **result}, indent=1))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
