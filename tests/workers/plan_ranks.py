"""Under torchrun: every rank takes part in `distload.plan_job` with the budgets in argv[3]
(JSON) and writes the plan it received to OUT/plan{R}.json. With argv[4] == "load" it then
loads with the same budgets (cpu and disk tiers executed by distload.offload) and runs one
forward; rank 0 saves the logits to OUT/logits.pt."""

import json
import os
import sys

import torch

import distload
from distload.loader import load

ckpt, out_dir, max_memory = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
also_load = len(sys.argv) > 4 and sys.argv[4] == "load"
kw = dict(max_memory=max_memory, device="cpu", max_seq_len=16, cache_dir=os.path.join(out_dir, "cache"))
plan = distload.plan_job(ckpt, **kw)
rank = int(os.environ["RANK"])
result = {"rank": rank, "plan": plan.to_json(), "digest": plan.digest(), "max_memory": max_memory}
if also_load:
    pipe = load(ckpt, offload_dir=os.path.join(out_dir, "offload"), **kw)
    result["load_digest"] = pipe.plan.digest()
    result["report"] = pipe.report
    logits = pipe.forward(torch.tensor([[1, 15, 27, 200, 42, 7], [5, 9, 81, 2, 3, 4]]))
    streamer = distload.offload.streamer_of(pipe.module)
    if streamer is not None:   # the executor honours the plan's streaming slots
        result["stream"] = {"max_resident": streamer.max_resident, "prefetch": streamer.prefetch,
                            "peak_resident": streamer.stats.peak_resident}
    if rank == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
with open(os.path.join(out_dir, f"plan{rank}.json"), "w") as f:
    json.dump(result, f)
distload.dist.shutdown(pipe.world if also_load else None)
