"""Offload figures: bytes written to the offload directory by a first and a second load,
and forward time with half the layers on the disk tier (warm page cache), with and
without prefetch, against the same model with nothing offloaded.

    python scripts/bench_offload.py                       # the demo model's shape, float32
    python scripts/bench_offload.py --dtype bfloat16      # a cast: entries are copies
    python scripts/bench_offload.py --threads 1            # a core left free for prefetch
    python scripts/bench_offload.py --json out.json

Runs in one process on the CPU (or `--device cuda:0`). Each variant is loaded the way
`distload.load` loads a stage (`key_tiers` → `allocate_stage` → the reader's `read` → `attach_tiers` →
`finish_stage`), with the plan's tiers set by hand: the later half of the layers on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distload.io import PosixReader
from distload.loader.materialize import allocate_stage, finish_stage, key_tiers
from distload.loader.prepare import PlanRequest, plan_load
from distload.loader.skeleton import build_stage_skeleton
from distload.loader.tiers import attach_tiers
from distload.plan.types import LoadPlan, Tier
from distload.sources.demo import DEMO_CONFIG, make_checkpoint


def half_on_disk(plan: LoadPlan) -> LoadPlan:
    """`plan` with the later half of each stage's layers on the disk tier."""
    stages = []
    for st in plan.stages:
        layers = [u for u in st.units if ".layers." in u]
        disk = set(layers[len(layers) // 2:])
        tiers = tuple(Tier.DISK if u in disk else t for u, t in zip(st.units, st.unit_tiers))
        stages.append(st.with_unit_tiers(tiers))
    return dataclasses.replace(plan, stages=tuple(stages))


def load_stage(plan: LoadPlan, root: str, device: torch.device, offload_dir: str, **attach_kw):
    module = build_stage_skeleton(plan, 0)
    storage = allocate_stage(plan, 0, module, device, tiers=key_tiers(plan, 0, device))
    reader = PosixReader(root)
    reader.read([m for m in plan.stage(0).reads if m.name in storage], storage)
    result = attach_tiers(plan, 0, module, storage, device, reader=reader,
                          offload_dir=offload_dir, **attach_kw)
    finish_stage(module, device, offloaded=result.params)
    return module.eval(), result


@torch.no_grad()
def time_forwards(modules: dict, ids: torch.Tensor, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Forward times of each module, interleaved round by round, so that other load on
    the machine (or clock changes) affects every variant alike."""
    pos = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
    ids = ids.to(device)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(repeats + 1):   # round 0 warms up: allocator, page cache, prefetch
        for name, module in modules.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(ids, position_ids=pos)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=DEMO_CONFIG["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=DEMO_CONFIG["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=DEMO_CONFIG["intermediate_size"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default=None, help="cast to this dtype (entries become copies)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch compute threads (default: all cores)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and offload dir go")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-offload-"))
    config = {**DEMO_CONFIG, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": args.intermediate}
    ckpt = work / "ckpt"
    if not ckpt.exists():
        make_checkpoint(config, ckpt, num_shards=3, dtype="float32")
    off = str(work / "offload")
    shutil.rmtree(off, ignore_errors=True)   # the first load starts from an empty directory
    plan = plan_load(PlanRequest(model=str(ckpt), dtype=args.dtype))
    disk_plan = half_on_disk(plan)

    figures: dict = {"config": {k: config[k] for k in ("num_hidden_layers", "hidden_size",
                                                       "intermediate_size")},
                     "dtype": args.dtype or "float32", "device": str(device),
                     "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads()}
    for run in ("first", "second"):
        start = time.perf_counter()
        _, res = load_stage(disk_plan, str(ckpt), device, off)
        figures[f"{run}_load"] = {"offload_bytes_written": res.bytes_written,
                                  "checkpoint_bytes_read_for_entries": res.bytes_read,
                                  "seconds": round(time.perf_counter() - start, 3)}
        res.streamer.close()
    figures["offloaded_bytes"] = res.report_fields()["offloaded_bytes_by_tier"]

    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    variants = {"resident": (plan, {}), "disk_prefetch": (disk_plan, {"prefetch": True}),
                "disk_no_prefetch": (disk_plan, {"prefetch": False})}
    loaded = {name: load_stage(p, str(ckpt), device, off, **kw) for name, (p, kw) in variants.items()}
    times = time_forwards({n: m for n, (m, _) in loaded.items()}, ids, args.repeats, device)
    results = {}
    for name, (_, res) in loaded.items():
        stats = res.streamer.stats if res.streamer else None
        results[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                         "wait_s_per_forward": stats.wait_seconds / (args.repeats + 1) if stats else 0.0}
    for name, r in results.items():
        # paired: each round's time over the resident module's in the same round, so load
        # from other processes that comes and goes cancels out; and the ratio of minima
        paired = [t / b for t, b in zip(times[name], times["resident"])]
        r["ratio_to_resident"] = round(statistics.median(paired), 3)
        r["ratio_of_minima"] = round(r["min_s"] / results["resident"]["min_s"], 3)
    figures["forward"] = results

    print(f"model: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"intermediate {config['intermediate_size']}; dtype {figures['dtype']}; {device}, "
          f"{figures['threads']} threads; forward of {args.batch}x{args.seq} tokens")
    print(f"offloaded: {figures['offloaded_bytes']['disk'] / 1e6:.1f} MB on the disk tier")
    for run in ("first", "second"):
        f = figures[f"{run}_load"]
        print(f"{run} load: wrote {f['offload_bytes_written']} bytes to the offload dir "
              f"({f['seconds']:.2f} s)")
    for name, r in results.items():
        print(f"{name:<18} median {r['median_s'] * 1e3:8.2f} ms  min {r['min_s'] * 1e3:8.2f} ms  "
              f"x{r['ratio_to_resident']:.3f} (paired median; minima x{r['ratio_of_minima']:.3f})  "
              f"waited {r['wait_s_per_forward'] * 1e3:6.2f} ms/forward")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
