"""One rank of `scripts/bench_hub.py` (run under torchrun, one launch per simulated node; not for users).

    _bench_hub_worker.py MODE OUT REPO T0

MODE ``distload``: `distload.load(REPO)` (plan from headers, each node downloads its ranks' shards).
MODE ``snapshot``: what users do today: each node's first rank `snapshot_download`s the whole repo
(config, safetensors, tokenizer: `HUB_PATTERNS`) into its node's cache while the node's other ranks
wait, then every rank loads the local snapshot with `distload.load(path)`.

Writes OUT/rank<R>.json: seconds since T0 (the driver's launch time, epoch seconds) at which this rank
had its first weights in memory (when distload's mapping of its stage returned) and its whole stage
loaded, and at which its imports were done; its node, and what distload reports it downloaded.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

import distload
import distload.loader.stage as stage
from distload.dist import init_world
from distload.sources.hub import HUB_PATTERNS

mode, out_dir, repo, t0 = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ready = time.time()  # imports done: what follows is the job's own work
first: list[float] = []
_map_stage = stage.map_stage


def map_stage(*args, **kwargs):  # the rank's first weights are in memory when this returns
    result = _map_stage(*args, **kwargs)
    first.append(time.time())
    return result


stage.map_stage = map_stage

if mode == "distload":
    pipe = distload.load(repo, device="cpu")
elif mode == "snapshot":
    from huggingface_hub import snapshot_download

    world = init_world(device="cpu")
    if world.is_node_leader:
        snapshot_download(repo, allow_patterns=HUB_PATTERNS)
    dist.barrier()
    path = snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True)
    pipe = distload.load(path, device="cpu")
else:
    raise SystemExit(f"unknown mode {mode!r}")
loaded = time.time()
result = {"rank": pipe.rank, "node": pipe.world.node, "ready_s": ready - t0, "first_weight_s": first[0] - t0,
          "loaded_s": loaded - t0,
          "fetched_bytes": pipe.report.get("fetched_bytes", 0), "bytes_read": pipe.report["bytes_read"]}
with open(os.path.join(out_dir, f"rank{pipe.rank}.json"), "w") as f:
    json.dump(result, f)
distload.dist.shutdown(pipe.world)
