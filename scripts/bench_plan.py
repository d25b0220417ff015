"""The planner's figures (issues 3 and 10). 1-3 on meta models only — no GPU, no
checkpoint files; 4 loads a small random-weight model.

1. Quality: a Llama with a large vocabulary (Llama-3-8B shapes, 8 layers: unequal unit
   costs — embedding ~0, 8 equal layers, a head worth ~2.4 layers) split over 3 devices. The slowest stage's per-token FLOPs for
   distload's plan, for the best possible split (brute force over every contiguous split
   that fits the budgets) and for accelerate's `infer_auto_device_map` with the same
   budgets, at several budget tightnesses.
2. Speed: planning an 80-layer, 70B-parameter Llama-3 config on meta — build the meta
   model, describe it, partition it, and write the full `LoadPlan` (read items for a
   synthetic 30-shard checkpoint header) — for several world sizes and budgets.
3. The seed workflow: Llama-2-70B on meta, ``max_memory={0: "20GB", 1: "20GB", "cpu":
   "100GB"}``, ``no_split_module_classes=["LlamaDecoderLayer"]``, float32 and bfloat16 —
   bytes per tier per device for distload's `infer_auto_device_map` and accelerate's,
   whether an offloaded unit sits between two GPUs, and the slowest stage's cost under
   distload's cost model (accelerate's offloaded modules charged as one slot: its hooks
   do not prefetch) as accelerate / distload.
4. A large embedding at tight cpu budgets (all-MiniLM-L6-v2's shapes, random weights,
   float32, 86.6 MiB; CPU only): bytes streamed per forward for distload's and
   accelerate's maps, and — each in a fresh process, accelerate's dispatch and distload's
   in one run — load time, median forward time (batch 4 x 128) and peak RSS, distload with
   and without prefetch.

    python scripts/bench_plan.py [--json out.json] [--only seed,embedding,...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from distload.checkpoint.types import TensorMeta
from distload.meta.describe import describe_model
from distload.compat.accelerate.device_map import plan_device_map
from distload.compat.accelerate.dispatch import device_for
from distload.meta import init_empty_weights
from distload.models import build_model
from distload.plan.budget import RankBudget
from distload.plan.planner import plan_model
from distload.plan.reserve import RunShape

LLAMA3_70B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
GiB = 2**30


def quality() -> list[dict]:
    from accelerate import infer_auto_device_map as accelerate_map
    from transformers import AutoModelForCausalLM, LlamaConfig

    # Llama-3-8B's shapes with 8 layers: the head costs ~2.4 layers, the embedding ~0.
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Device 0 is not available": planning only
    logging.getLogger("distload").setLevel(logging.ERROR)    # "GPU(s) 0, 1, 2 ... not present": likewise
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    spec = describe_model(model)
    costs = [u.cost for u in spec.units]
    sizes = [sum(p.numel for p in u.params) * 4 for u in spec.units]
    total = sum(sizes)
    rows = []
    for slack in (1.15, 1.3, 1.5, 2.0, 3.0):
        budget = int(total / 3 * slack)

        def stage_costs(device_map) -> list[float]:
            out = [0.0] * 3
            for unit in spec.units:
                out[device_for(unit.name, device_map)[1]] += unit.cost
            return out

        best = min((max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])), bounds)
                   for cuts in itertools.combinations(range(1, len(costs)), 2)
                   for bounds in [(0, *cuts, len(costs))]
                   if all(sum(sizes[a:b]) <= budget for a, b in zip(bounds, bounds[1:])))
        plan = plan_device_map(model, {i: budget for i in range(3)})
        ours = stage_costs(plan.device_map)
        theirs_map = accelerate_map(model, max_memory={i: budget for i in range(3)},
                                    no_split_module_classes=["LlamaDecoderLayer"])
        offloaded = [k for k, v in theirs_map.items() if not isinstance(v, int)]
        theirs = stage_costs({k: v for k, v in theirs_map.items() if isinstance(v, int)}) if not offloaded else None
        rows.append({
            "budget_per_device": budget, "slack": slack,
            "distload_bounds": list(plan.partition.bounds), "distload_max": max(ours),
            "best_bounds": list(best[1]), "best_max": best[0],
            "ratio_to_best": max(ours) / best[0],
            "accelerate_max": max(theirs) if theirs else None,
            "accelerate_offloaded": offloaded,
            "accelerate_stage_costs": theirs, "distload_stage_costs": ours,
        })
    return rows


def _synthetic_checkpoint(spec, shards: int = 30) -> dict[str, TensorMeta]:
    params = [p for u in spec.units for p in u.params]
    per = -(-len(params) // shards)
    tensors, offset = {}, {}
    for i, p in enumerate(params):
        file = f"/ckpt/model-{i // per + 1:05d}-of-{shards:05d}.safetensors"
        length = p.numel * 2
        start = offset.get(file, 8 + 4096)
        tensors[p.name] = TensorMeta(p.name, file, "bfloat16", p.shape, start, length)
        offset[file] = start + length
    return tensors


def speed(repeats: int = 5) -> list[dict]:
    rows = []
    cases = [(8, RankBudget(76 * GiB, 200 * GiB, None)), (4, RankBudget(76 * GiB, 200 * GiB, None)),
             (4, RankBudget(24 * GiB, 100 * GiB, None)), (2, RankBudget(40 * GiB, 40 * GiB, None)),
             (16, RankBudget(76 * GiB, 200 * GiB, None))]
    for world, budget in cases:
        times, stages = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            with init_empty_weights():      # as distload.prepare does: buffers on the CPU
                model = build_model(LLAMA3_70B)
            built = time.perf_counter()
            spec = describe_model(model)
            tensors = _synthetic_checkpoint(spec)
            described = time.perf_counter()
            plan = plan_model(spec, tensors, budgets=[budget] * world, source={"kind": "local", "label": "ckpt"},
                              format="safetensors", config=LLAMA3_70B, shape=RunShape(1, 4096))
            done = time.perf_counter()
            times.append((done - start, built - start, described - built, done - described))
            stages = [(s.units[0], s.units[-1], dict(s.held_bytes)) for s in plan.stages]
        params = sum(p.numel() for p in model.parameters())
        rows.append({
            "world_size": world, "budget": budget.as_dict(), "params": params, "units": len(spec.units),
            "first_s": round(times[0][0], 3), "median_s": round(statistics.median(t[0] for t in times), 3),
            "median_build_s": round(statistics.median(t[1] for t in times), 3),
            "median_describe_s": round(statistics.median(t[2] for t in times), 3),
            "median_plan_s": round(statistics.median(t[3] for t in times), 3),
            "stages": stages,
        })
    return rows


LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096)
SEED_MEMORY = {0: "20GB", 1: "20GB", "cpu": "100GB"}


def _map_figures(model, spec, device_map: dict, itemsize: int, slots: int) -> dict:
    """Bytes per device-map value, the stage costs under distload's cost model (one stage
    per GPU; the offloaded units a stage of their own, on the first GPU), and whether an
    offloaded unit comes before a GPU's unit in execution order."""
    from distload.plan.stage import PlannerOptions

    opt = PlannerOptions()
    per_device: dict[str, int] = {}
    for name, p in model.named_parameters():
        dev = str(device_for(name, device_map)[1])
        per_device[dev] = per_device.get(dev, 0) + p.numel() * itemsize
    costs: dict[str, float] = {}
    order, factor = [], opt.no_prefetch_factor if slots == 1 else 1.0
    for unit in spec.units:
        dev = device_for(unit.params[0].name, device_map)[1]
        nbytes = sum(p.numel for p in unit.params) * itemsize
        order.append(dev)
        if isinstance(dev, int):
            costs[str(dev)] = costs.get(str(dev), 0.0) + unit.cost
        else:
            pen = opt.cpu_penalty if dev == "cpu" else opt.disk_penalty
            costs["offloaded"] = costs.get("offloaded", 0.0) + unit.cost + factor * pen * nbytes
    between = any(not isinstance(a, int) and isinstance(b, int) for i, a in enumerate(order) for b in order[i + 1:])
    return {"bytes": per_device, "stage_costs": costs, "slowest": max(costs.values()),
            "offloaded_between_gpus": between}


def seed_70b() -> list[dict]:
    from accelerate import infer_auto_device_map as accelerate_map
    from transformers import AutoModelForCausalLM, LlamaConfig

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("distload").setLevel(logging.ERROR)   # "GPU(s) 0, 1 not present": planning only
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_70B))
    spec = describe_model(model, no_split_module_classes=["LlamaDecoderLayer"])
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        plan = plan_device_map(model, dict(SEED_MEMORY), no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
        seconds = time.perf_counter() - start
        slots = max(s.stream_slots for s in plan.partition.stages)
        ours = _map_figures(model, spec, plan.device_map, dtype.itemsize, slots)
        theirs_map = accelerate_map(model, max_memory=dict(SEED_MEMORY),
                                    no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
        theirs = _map_figures(model, spec, theirs_map, dtype.itemsize, 1)
        same = _map_figures(model, spec, theirs_map, dtype.itemsize, slots)   # as if it prefetched
        rows.append({"dtype": str(dtype).replace("torch.", ""), "plan_seconds": round(seconds, 3),
                     "stream_slots": slots, "distload": ours, "accelerate": theirs,
                     "slowest_ratio": theirs["slowest"] / ours["slowest"],
                     "slowest_ratio_same_slots": same["slowest"] / ours["slowest"]})
    return rows


MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
EMBEDDING_BUDGETS_MIB = (52, 60, 70)


def _measure(job: dict) -> dict:
    """One configuration in this (fresh) process: load, then time forwards, sampling RSS."""
    import psutil
    from transformers import BertConfig, BertModel

    torch.set_num_threads(1)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    with init_empty_weights():
        model = BertModel(BertConfig(**MINILM))
    device_map = job["device_map"]
    start = time.perf_counter()
    if job["tool"] == "accelerate":
        from accelerate import load_checkpoint_and_dispatch as accelerate_dispatch

        model = accelerate_dispatch(model, job["ckpt"], device_map=device_map, offload_folder=job["offload"])
    else:
        from distload import load_checkpoint_and_dispatch

        model = load_checkpoint_and_dispatch(model, job["ckpt"], device_map=device_map,
                                             offload_folder=job["offload"], stream_slots=job["slots"])
    loaded = time.perf_counter() - start
    ids = torch.randint(0, MINILM["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0))
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    times = []
    from distload.offload import streamer_of

    streamer = streamer_of(model)
    with torch.no_grad():
        model.eval()(ids)                     # warm-up
        fetched = streamer.stats.bytes_fetched if streamer else 0
        before = proc.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
        stop.set()
        sampler.join()
    return {"load_s": round(loaded, 3), "forward_s": round(statistics.median(times), 4),
            "fetched_per_forward": ((streamer.stats.bytes_fetched - fetched) // job["repeats"]) if streamer else None,
            "rss_before_forwards": before, "rss_growth_forwards": max(peak[0] - before, 0),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def large_embedding(repeats: int) -> list[dict]:
    from accelerate import infer_auto_device_map as accelerate_map
    from transformers import BertConfig, BertModel

    from distload import infer_auto_device_map

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        ckpt = os.path.join(tmp, "minilm")
        torch.manual_seed(0)
        BertModel(BertConfig(**MINILM)).save_pretrained(ckpt)
        with init_empty_weights():
            model = BertModel(BertConfig(**MINILM))
        sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
        for mib in EMBEDDING_BUDGETS_MIB:
            budget = {"cpu": f"{mib}MiB"}
            ours = infer_auto_device_map(model, max_memory=budget)
            theirs = accelerate_map(model, max_memory=budget)
            row = {"budget_mib": mib, "distload_map": dict(ours), "accelerate_map": dict(theirs),
                   "distload_slots": ours.stream_slots}
            for tool, dm in (("distload", ours), ("accelerate", theirs)):
                row[f"{tool}_streamed_per_forward"] = sum(b for n, b in sizes.items() if device_for(n, dm)[1] == "disk")
                row[f"{tool}_resident"] = sum(b for n, b in sizes.items() if device_for(n, dm)[1] != "disk")
            jobs = [("accelerate", 1), ("distload", 2), ("distload", 1)]
            for tool, slots in jobs:
                job = {"tool": tool, "ckpt": ckpt, "offload": os.path.join(tmp, f"off-{tool}-{mib}"),
                       "device_map": dict(ours if tool == "distload" else theirs), "slots": slots,
                       "repeats": repeats}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    row[f"{tool}_{slots}"] = {"error": out.stderr.strip().splitlines()[-1]}
                else:
                    row[f"{tool}_{slots}"] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
    return rows


def _print_seed(rows: list[dict]) -> None:
    for row in rows:
        print(f"seed 70B {row['dtype']} (planned in {row['plan_seconds']} s, {row['stream_slots']} slot(s)):")
        for tool in ("distload", "accelerate"):
            f = row[tool]
            tiers = ", ".join(f"{k}: {v / 1e9:.1f} GB" for k, v in sorted(f["bytes"].items()))
            print(f"  {tool:10s} {tiers}; offloaded between GPUs: {f['offloaded_between_gpus']}; "
                  f"slowest stage {f['slowest']:.4g}")
        print(f"  slowest stage accelerate / distload: {row['slowest_ratio']:.3f} (accelerate's hooks "
              f"without prefetch); {row['slowest_ratio_same_slots']:.3f} with accelerate charged as prefetching")


def _print_embedding(rows: list[dict]) -> None:
    MB = 2**20
    for row in rows:
        print(f"MiniLM-shaped BERT (86.6 MiB) at cpu {row['budget_mib']} MiB: streamed per forward "
              f"distload {row['distload_streamed_per_forward'] / MB:.1f} MiB (resident "
              f"{row['distload_resident'] / MB:.1f}), accelerate {row['accelerate_streamed_per_forward'] / MB:.1f} "
              f"MiB (resident {row['accelerate_resident'] / MB:.1f}); distload's plan: {row['distload_slots']} slot(s)")
        for key, label in (("accelerate_1", "accelerate (its hooks: no prefetch)"),
                           ("distload_2", "distload, prefetch (2 slots)"),
                           ("distload_1", "distload, no prefetch (1 slot)")):
            m = row[key]
            if "error" in m:
                print(f"    {label}: failed: {m['error']}")
                continue
            fetched = "" if m["fetched_per_forward"] is None else \
                f", fetched {m['fetched_per_forward'] / MB:.1f} MiB per forward (measured)"
            print(f"    {label}: forward {m['forward_s'] * 1e3:.1f} ms (median), peak RSS "
                  f"{m['peak_rss'] / MB:.0f} MiB, RSS growth during forwards {m['rss_growth_forwards'] / MB:.1f} MiB"
                  f"{fetched}; load {m['load_s']:.2f} s")
        if "error" not in row["accelerate_1"] and "error" not in row["distload_2"]:
            print(f"    forward time distload(prefetch) / accelerate: "
                  f"{row['distload_2']['forward_s'] / row['accelerate_1']['forward_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="quality,speed,seed,embedding",
                        help="comma-separated parts: quality, speed, seed, embedding")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(json.loads(args.worker))))
        return
    torch.set_num_threads(1)
    parts = set(args.only.split(","))
    print(f"machine: {os.cpu_count()} CPUs, shared with other jobs (figures vary run to run); "
          "load times include writing the offload store on a budget's first distload run only")
    figures = {}
    if "quality" in parts:
        figures["quality"] = quality()
    if "speed" in parts:
        figures["speed_70b"] = speed(args.repeats)
    if "seed" in parts:
        figures["seed_70b"] = seed_70b()
        _print_seed(figures["seed_70b"])
    if "embedding" in parts:
        figures["large_embedding"] = large_embedding(args.repeats)
        _print_embedding(figures["large_embedding"])
    for row in figures.get("quality", []):
        acc = row["accelerate_max"]
        print(f"budget {row['slack']:.2f} x total/3: distload max {row['distload_max']:.4g} "
              f"(bounds {row['distload_bounds']}), best {row['best_max']:.4g} -> ratio "
              f"{row['ratio_to_best']:.3f}; accelerate max "
              + (f"{acc:.4g} ({acc / row['distload_max']:.2f} x distload)" if acc else
                 f"n/a (offloads {row['accelerate_offloaded']})"))
    for row in figures.get("speed_70b", []):
        b = row["budget"]
        print(f"70B ({row['params'] / 1e9:.1f} B params, {row['units']} units) on {row['world_size']} ranks, "
              f"device {b['device'] / GiB:.0f} GiB cpu {b['cpu'] / GiB:.0f} GiB: first {row['first_s']:.3f} s, "
              f"median {row['median_s']:.3f} s (build {row['median_build_s']:.3f}, describe "
              f"{row['median_describe_s']:.3f}, plan {row['median_plan_s']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
