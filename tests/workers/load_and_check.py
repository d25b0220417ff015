"""Under torchrun: load a checkpoint with distload and compare every parameter of this
rank's stage against safetensors' own reader. Writes OUT/rank{R}.json."""

import json
import os
import sys

import torch
from safetensors import safe_open

import distload

ckpt, out_dir = sys.argv[1], sys.argv[2]
dtype = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None
pipe = distload.load(ckpt, dtype=dtype, device="cpu")
rank = pipe.rank

handles = {}
mismatches, checked = [], 0
for src in pipe.plan.stage(rank).params:
    meta = next((m.located(pipe.root) for s in pipe.plan.stages for m in s.reads if m.name == src.key))
    if meta.file not in handles:
        handles[meta.file] = safe_open(meta.file, framework="pt")
    reference = handles[meta.file].get_tensor(src.key)
    if dtype is not None:
        reference = reference.to(getattr(torch, dtype))
    mine = pipe.module.get_parameter(src.param)
    checked += 1
    if mine.dtype != reference.dtype or not torch.equal(mine, reference):
        mismatches.append(src.param)
meta_left = [n for n, t in list(pipe.module.named_parameters()) + list(pipe.module.named_buffers()) if t.is_meta]
result = {"rank": rank, "checked": checked, "mismatches": mismatches, "meta_left": meta_left,
          "report": pipe.report, "job_report": pipe.job_report if rank == 0 else None,
          "digest": pipe.plan.digest(), "header_bytes": None}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
distload.dist.shutdown(pipe.world)
