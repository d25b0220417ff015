"""Under torchrun: `pipe.forward` on each checkpoint given, plain (no mask, 2 micro-batches)
and left padded (3 and 5 micro-batches). Rank 0 saves OUT/<ckpt name>.pt with the inputs
and logits; every rank writes OUT/<ckpt name>_rank<R>.json: what it returned, its stage,
the error a bad input on rank 0 gave it, and the Python threads alive after the calls (no
load-time heartbeat or progress thread may outlive the load and wake during a call).

    torchrun --nproc_per_node=2 pipeline_forward.py OUT CKPT [CKPT ...]
"""

import json
import os
import sys
import threading

import torch

import distload
from pipeline_inputs import batch

out_dir, ckpts = sys.argv[1], sys.argv[2:]
pipe = None
for ckpt in ckpts:
    name = os.path.basename(ckpt)
    pipe = distload.load(ckpt, device="cpu")
    ids, mask = batch(pipe.plan.config["vocab_size"])
    results = {
        "plain": pipe.forward(ids, micro_batches=2),
        "padded": pipe.forward(ids, mask, micro_batches=3),
        "padded_m5": pipe.forward(ids, mask, micro_batches=5),
    }
    try:  # a bad input on rank 0 must fail on every rank, without a hang
        pipe.forward(ids + pipe.plan.config["vocab_size"])
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    if pipe.rank == 0:
        torch.save({"ids": ids, "mask": mask, **results}, os.path.join(out_dir, f"{name}.pt"))
    record = {"rank": pipe.rank, "none_returned": [k for k, v in results.items() if v is None],
              "units": list(pipe.plan.stage(pipe.rank).units), "bad_input_error": error,
              "threads": sorted(t.name for t in threading.enumerate())}
    with open(os.path.join(out_dir, f"{name}_rank{pipe.rank}.json"), "w") as f:
        json.dump(record, f)
distload.dist.shutdown(pipe.world)
