"""`scripts/bench_load.py CKPT --staged`: distload's staged read path forced on the CPU
(the GPU path minus the copy to the device) — or, with ``--device cuda``, the real GPU
path into each rank's GPU — against a raw read of the same bytes, in one torchrun, warm and (``--cold``) cold, for several thread counts, with and without
O_DIRECT. See `_bench_staged_worker.py` for what each rank times.

On the CPU the row ``copy`` times the staging copy alone (memmove into the destinations,
no read): the work a GPU's copy engine does in place of the CPU, and why the staged path
on the CPU is bounded by 1 / (1/raw + 1/copy) when no core is spare (printed).

Figures per mode and configuration, medians over repeats: the job's GB/s (the bytes of
every rank over the slowest rank's seconds), each rank's GB/s, and the ratio to the raw
read (``x raw``: raw seconds / staged seconds within the same repeat, then the median)
and to the raw read into the destinations (``x raw→dest``). Goal (issue 14): >= 0.9x raw
warm and cold. Cold = every checkpoint page evicted with `posix_fadvise(DONTNEED)` before
each measurement (no root needed); the share still resident after eviction is printed.

Example::

    python scripts/bench_load.py /tmp/ckpt --staged --nproc 2 --cold --repeats 3 --json staged.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "_bench_staged_worker.py"
GOAL = 0.9
GB = 1e9


def run_worker(a, plan_path: Path, out: Path, modes: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(WORKER), f"--ckpt={a.ckpt.resolve()}", f"--plan={plan_path}", f"--out={out}",
           f"--modes={','.join(modes)}", f"--repeats={a.repeats}", f"--threads={a.threads}",
           f"--direct={a.direct}", f"--staging-bytes={a.staging_bytes}", f"--device={a.device}"]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"the staged benchmark failed (exit {proc.returncode}):\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.nproc)]


def summarize(ranks: list[dict]) -> dict:
    """mode -> config key -> medians; config key = (system, threads, direct)."""
    rows: dict = {}
    for r, part in enumerate(ranks):
        for x in part["results"]:
            key = (x["mode"], x["rep"], x["system"], x["threads"], x["direct"])
            rows.setdefault(key, {})[r] = x
    jobs: dict = {}   # (mode, rep, system, threads, direct) -> job figures
    for key, per_rank in rows.items():
        seconds = max(x["seconds"] for x in per_rank.values())
        jobs[key] = {"seconds": seconds, "bytes": sum(x["bytes"] for x in per_rank.values()),
                     "rank_gbps": [per_rank[r]["bytes"] / per_rank[r]["seconds"] / GB for r in sorted(per_rank)],
                     "extra": per_rank[min(per_rank)]}
    out: dict = {}
    med = statistics.median
    for (mode, rep, system, threads, direct), job in jobs.items():
        raw, raw_dest = jobs[(mode, rep, "raw", 1, False)], jobs.get((mode, rep, "raw_dest", 1, False))
        c = out.setdefault(mode, {}).setdefault(f"{system}|{threads}|{direct}", {
            "system": system, "threads": threads, "direct": direct, "gbps": [], "rank_gbps": [],
            "x_raw": [], "x_raw_dest": [], "staging_bytes": 0, "direct_files": 0, "refused_files": 0,
            "resident_after_evict": [], "loadavg": []})
        c["gbps"].append(job["bytes"] / job["seconds"] / GB)
        c["rank_gbps"].append(job["rank_gbps"])
        c["x_raw"].append(raw["seconds"] / job["seconds"])
        if raw_dest is not None:
            c["x_raw_dest"].append(raw_dest["seconds"] / job["seconds"])
        e = job["extra"]
        c["staging_bytes"] = max(c["staging_bytes"], e.get("staging_bytes", 0))
        c["direct_files"] = max(c["direct_files"], e.get("direct_files", 0))
        c["refused_files"] = max(c["refused_files"], e.get("refused_files", 0))
        c["loadavg"].append(e["loadavg"])
        if e.get("resident_after_evict") is not None:
            c["resident_after_evict"].append(e["resident_after_evict"])
    for mode in out.values():
        for c in mode.values():
            c["median"] = {"gbps": med(c["gbps"]), "x_raw": med(c["x_raw"]),
                           "x_raw_dest": med(c["x_raw_dest"]) if c["x_raw_dest"] else None,
                           "rank_gbps": [med(v) for v in zip(*c["rank_gbps"])]}
    return out


def format_mode(mode: str, configs: dict, nproc: int) -> str:
    head = (f"{'system':<9} {'threads':>7} {'O_DIRECT':>8} {'GB/s':>6} {'per rank GB/s':>15} {'x raw':>6} "
            f"{'x raw→dest':>10} {'staging MB':>10} {'direct files':>12}")
    lines = [head, "-" * len(head)]
    order = sorted(configs.values(), key=lambda c: (c["system"] != "raw", c["system"] != "raw_dest",
                                                    c["system"] != "copy", c["direct"], c["threads"]))
    for c in order:
        m = c["median"]
        direct = ("yes" if c["direct_files"] else "refused") if c["direct"] else "no"
        files = f"{c['direct_files']} ({c['refused_files']} refused)" if c["direct"] else ""
        lines.append(f"{c['system']:<9} {c['threads']:>7} {direct:>8} {m['gbps']:>6.2f} "
                     f"{' '.join(f'{g:.2f}' for g in m['rank_gbps']):>15} {m['x_raw']:>5.2f}x "
                     f"{_ratio(m['x_raw_dest']):>10} {c['staging_bytes'] / 1e6:>10.1f} {files:>12}")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def copy_lines(summary: dict) -> list[str]:
    """What the staging copy costs on the CPU: one thread that reads then copies each
    chunk can reach at best 1 / (1/raw + 1/copy) of the two alone (no core to spare)."""
    out = []
    for mode, configs in summary.items():
        if "copy|1|False" not in configs:
            continue
        raw, copy = configs["raw|1|False"]["median"]["gbps"], configs["copy|1|False"]["median"]["gbps"]
        serial = 1 / (1 / raw + 1 / copy)
        out.append(f"{mode}: raw read {raw:.2f} GB/s, the staging copy alone {copy:.2f} GB/s: read then copy "
                   f"on one core at best {serial:.2f} GB/s = {serial / raw:.2f}x raw")
    return out


def goal_lines(summary: dict) -> list[str]:
    out = []
    for mode, configs in summary.items():
        staged = [c for c in configs.values() if c["system"] == "staged"]
        best = max(staged, key=lambda c: c["median"]["x_raw"])
        passing = sorted((c["threads"], c["direct"]) for c in staged if c["median"]["x_raw"] >= GOAL)
        out.append(f"goal {mode}: >= {GOAL}x raw: {'PASS' if passing else 'FAIL'}; best {best['median']['x_raw']:.2f}x "
                   f"({best['threads']} thread(s), O_DIRECT {'on' if best['direct'] else 'off'}); passing: "
                   + (", ".join(f"{t}t{'+direct' if d else ''}" for t, d in passing) or "none"))
    return out


def staged_main(a, make_plan, machine_note, cpu_seconds) -> int:
    """Run the staged benchmark (`a` from bench_load's parser); print and write the figures."""
    start, cpu0 = time.perf_counter(), cpu_seconds()
    modes = ["warm"] + (["cold"] if a.cold else [])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-staged-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan = make_plan(a.ckpt, a.nproc, plan_path)
        total = sum(s.tensor_bytes for s in plan.stages)
        print(f"checkpoint {a.ckpt}: {total / 1e6:.1f} MB of tensors; {a.nproc} rank(s) on {a.device}; staging "
              f"{a.staging_bytes / (1 << 20):g} MiB; threads {a.threads}; O_DIRECT {a.direct}; "
              f"{a.repeats} repeat(s); modes {', '.join(modes)}; load average before "
              f"{' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
        out = Path(tmp) / "out"
        out.mkdir()
        ranks = run_worker(a, plan_path, out, modes)
    summary = summarize(ranks)
    for mode in modes:
        resident = [x for c in summary[mode].values() for x in c["resident_after_evict"]]
        loads = [x for c in summary[mode].values() for x in c["loadavg"]]
        note = f"; resident after eviction: max {100 * max(resident):.1f}%" if resident else ""
        print(f"\n== {mode}: {a.nproc} rank(s) ({a.device}), medians of {a.repeats} (load average during: "
              f"{min(loads):.1f}-{max(loads):.1f}{note}) ==")
        print(format_mode(mode, summary[mode], a.nproc))
    exact = all(r["bit_exact"] for r in ranks)
    print(f"\nstaged read bit-exact against safetensors on every rank: {'yes' if exact else 'NO'}")
    goals = goal_lines(summary)
    print("\n".join(copy_lines(summary) + goals))
    note = machine_note(cpu0)
    print(note["text"])
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"benchmark took {time.perf_counter() - start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": str(a.ckpt), "nproc": a.nproc, "repeats": a.repeats,
                                      "device": a.device,
                                      "staging_bytes": a.staging_bytes, "modes": modes, "summary": summary,
                                      "bit_exact": exact, "goals": goals, "machine": note,
                                      "load_before": load_before, "ranks": ranks}, indent=1, default=str))
    return 0 if exact else 1
