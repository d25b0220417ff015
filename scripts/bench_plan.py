"""The planner's figures (issue 3), on meta models only — no GPU, no checkpoint files.

1. Quality: a Llama with a large vocabulary (Llama-3-8B shapes, 8 layers: unequal unit
   costs — embedding ~0, 8 equal layers, a head worth ~2.4 layers) split over 3 devices. The slowest stage's per-token FLOPs for
   distload's plan, for the best possible split (brute force over every contiguous split
   that fits the budgets) and for accelerate's `infer_auto_device_map` with the same
   budgets, at several budget tightnesses.
2. Speed: planning an 80-layer, 70B-parameter Llama-3 config on meta — build the meta
   model, describe it, partition it, and write the full `LoadPlan` (read items for a
   synthetic 30-shard checkpoint header) — for several world sizes and budgets.

    python scripts/bench_plan.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {"quality": quality(), "speed_70b": speed(args.repeats)}
    for row in figures["quality"]:
        acc = row["accelerate_max"]
        print(f"budget {row['slack']:.2f} x total/3: distload max {row['distload_max']:.4g} "
              f"(bounds {row['distload_bounds']}), best {row['best_max']:.4g} -> ratio "
              f"{row['ratio_to_best']:.3f}; accelerate max "
              + (f"{acc:.4g} ({acc / row['distload_max']:.2f} x distload)" if acc else
                 f"n/a (offloads {row['accelerate_offloaded']})"))
    for row in figures["speed_70b"]:
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
