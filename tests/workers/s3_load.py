"""Under torchrun (one launch, or one per simulated node): load an s3:// checkpoint and write
OUT/rank{R}.json — its report, every resident parameter of its stage compared with
safetensors' own reader of the original files in SOURCE, and on rank 0 whether the
pipeline's logits equal transformers' of SOURCE (with --logits: so disk-tier weights,
streamed from the node's offload store, are checked too).

    s3_load.py OUT URL SOURCE MAX_MEMORY_JSON [--logits]
"""

import json
import os
import sys

import torch
from safetensors import safe_open

import distload

out_dir, url, source, max_memory = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
logits_check = "--logits" in sys.argv[5:]
if max_memory:
    max_memory = {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}
rank = int(os.environ["RANK"])
result = {"rank": rank}
try:
    pipe = distload.load(url, device="cpu", max_memory=max_memory or None, max_batch_size=1, max_seq_len=16,
                         timeout_s=60.0)
    reads = {m.name: m for s in pipe.plan.stages for m in s.reads}
    checked, mismatches, handles = 0, [], {}
    for src in pipe.plan.stage(rank).params:
        mine = pipe.module.get_parameter(src.param)
        if mine.is_meta:                      # the disk tier: checked through the logits
            continue
        file = os.path.join(source, reads[src.key].file)
        handles.setdefault(file, safe_open(file, framework="pt"))
        checked += 1
        if not torch.equal(mine, handles[file].get_tensor(src.key)):
            mismatches.append(src.param)
    ids = torch.tensor([[1, 15, 27, 200, 42, 7]])
    with torch.no_grad():
        logits = pipe.forward(ids)
    if rank == 0 and logits_check:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(ids).logits
        result["logits_close"] = bool(torch.allclose(logits.float(), expected, atol=1e-4, rtol=1e-4))
    result.update(checked=checked, mismatches=mismatches, report=pipe.report,
                  tiers=list(pipe.plan.stage(rank).unit_tiers))
except Exception as e:  # noqa: BLE001 - the test reads the error
    result["error"] = f"{type(e).__name__}: {e}"
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
distload.dist.shutdown()
