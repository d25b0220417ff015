"""Under torchrun, one launch per simulated node (HF_ENDPOINT carries the node's prefix): load
hub ids one after the other and, after each, write OUT/<n>/rank{R}.json — whether it loaded,
its error, how long it took, every parameter of this rank's stage compared with safetensors'
own reader of the original files in SOURCE, and (rank 0) the plan's budgets and the fake
hub's statistics of that load, reset before the next.

    hub_load.py OUT SOURCE SPEC [SPEC ...]

SPEC: a hub id, loaded (results in OUT/0, OUT/1, ... in order); "@max_memory=JSON" or
"@timeout=S": the max_memory or timeout_s of the loads after it (the first load's timeout is
the process group's).
"""

import json
import os
import sys
import time
import urllib.request

import torch
import torch.distributed as dist
from safetensors import safe_open

import distload

out_dir, source, *specs = sys.argv[1:]
options = {"max_memory": None, "timeout_s": 30.0}
endpoint = os.environ["HF_ENDPOINT"]
control = endpoint[:endpoint.index("/", len("http://"))] if endpoint.count("/") > 2 else endpoint


def hub(path: str) -> dict:
    request = urllib.request.Request(control + path, data=b"" if path == "/_reset" else None)
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def compare(pipe) -> tuple[int, list[str]]:
    """This rank's parameters against safetensors reading the checkpoint the hub serves."""
    handles, mismatches, checked = {}, [], 0
    reads = {m.name: m for s in pipe.plan.stages for m in s.reads}
    for src in pipe.plan.stage(pipe.rank).params:
        file = os.path.join(source, reads[src.key].file)
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        reference = handles[file].get_tensor(src.key)
        mine = pipe.module.get_parameter(src.param)
        checked += 1
        if mine.dtype != reference.dtype or not torch.equal(mine, reference):
            mismatches.append(src.param)
    return checked, mismatches


n = -1
for spec in specs:
    if spec.startswith("@"):
        key, value = spec[1:].split("=", 1)
        options["timeout_s" if key == "timeout" else key] = json.loads(value)
        continue
    n += 1
    start = time.monotonic()
    result = {"spec": spec}
    try:
        pipe = distload.load(spec, device="cpu", **options)
        result.update(ok=True, root=pipe.root, report=pipe.report, node_ranks=pipe.world.node_ranks(),
                      files=sorted({m.file for m in pipe.plan.stage(pipe.rank).reads}),
                      budgets=[s.budget for s in pipe.plan.stages], file_sizes=dict(pipe.plan.file_sizes))
        result["checked"], result["mismatches"] = compare(pipe)
        result["meta_left"] = [k for k, t in pipe.module.state_dict().items() if t.is_meta]
    except Exception as e:  # noqa: BLE001 - the error is what some cases check
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    result["seconds"] = time.monotonic() - start
    dist.barrier()
    if dist.get_rank() == 0:
        result["stats"] = hub("/_stats")
        hub("/_reset")
    os.makedirs(os.path.join(out_dir, str(n)), exist_ok=True)
    with open(os.path.join(out_dir, str(n), f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
distload.dist.shutdown()
