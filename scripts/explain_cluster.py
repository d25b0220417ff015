"""`--explain` of a checkpoint on a cluster this machine is not: the plan rank 0 would make
for `--nodes` nodes of `--gpus-per-node` GPUs of `--gpu-memory` each (and `--cpu` host
memory per node for the cpu tier), from headers alone — each rank's measurement is the
one such a node would report. Pair it with `make_checkpoint.py --headers-only`.

    python scripts/make_checkpoint.py /tmp/dsv3 --config scripts/configs/deepseek-v3.json \\
        --headers-only --shards 163
    python scripts/explain_cluster.py /tmp/dsv3 --nodes 2 --gpus-per-node 8 --gpu-memory 80GB \\
        --cpu 1.5TB
"""

from __future__ import annotations

import argparse
import sys
import time

from distload.loader.prepare import PlanRequest, plan_load
from distload.plan.budget import LocalMemory, parse_max_memory
from distload.plan.explain import explain_plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory (headers-only is enough)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", default="80GB", help="each GPU's budget")
    p.add_argument("--cpu", default=None, help="host memory per node for the cpu tier")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    args = p.parse_args(argv)
    world = args.nodes * args.gpus_per_node
    spec = {str(r): args.gpu_memory for r in range(world)}
    if args.cpu:
        spec["cpu"] = args.cpu
    limits = parse_max_memory(spec)
    node = LocalMemory("cuda", limits[0], limits.get("cpu", 0), None, args.gpus_per_node)
    start = time.perf_counter()
    plan = plan_load(PlanRequest(model=args.model, world_size=world, dtype=args.dtype, max_memory=limits,
                                 measured=(node,) * world, max_batch_size=args.max_batch_size,
                                 max_seq_len=args.max_seq_len))
    sys.stdout.write(explain_plan(plan))
    print(f"planned in {time.perf_counter() - start:.1f} s; bytes read per rank (GB): "
          + " ".join(f"{s.tensor_bytes / 1e9:.1f}" for s in plan.stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
