"""Under torchrun: a launcher's shape. Rank 0 alone decides what runs: a forward, then it
idles longer than the process group's timeout (TIMEOUT s), then generates, makes two bad
calls, streams three batches, generates 0 tokens, and closes; the other ranks only run
`pipe.serve()`. After the close, every rank tries one more call. Rank 0 saves OUT/serve.pt
(inputs and outputs); every rank writes OUT/serve_rank<R>.json with what it saw.

    torchrun --nproc_per_node=2 pipeline_serve.py OUT CKPT TIMEOUT
    torchrun --nproc_per_node=2 pipeline_serve.py OUT CKPT mismatch   # rank 1 calls forward
                                                                      # while rank 0 generates
    torchrun --nproc_per_node=3 pipeline_serve.py OUT CKPT quick      # calls that end on rank 0
                                   # before the last rank, late, has read their announcement
"""

import json
import os
import sys
import time

import torch

import distload
from pipeline_inputs import batch, error_of

out_dir, ckpt, mode = sys.argv[1], sys.argv[2], sys.argv[3]
timeout = 60.0 if mode in ("mismatch", "quick") else float(mode)
pipe = distload.load(ckpt, device="cpu", timeout_s=timeout)
vocab = pipe.plan.config["vocab_size"]
ids, mask = batch(vocab)
record = {"rank": pipe.rank}

if mode == "mismatch":
    if pipe.rank == 0:
        pipe.generate(ids, mask, max_new_tokens=4)
    else:
        pipe.forward()
    raise SystemExit("unreachable: a mismatched call must fail")

if mode == "quick":
    if pipe.world.is_last:
        time.sleep(3)
    for _ in range(3):
        list(pipe.forward_stream([] if pipe.rank == 0 else None))
    pipe.generate(ids if pipe.rank == 0 else None, max_new_tokens=0)
    logits = pipe.forward(ids if pipe.rank == 0 else None, mask)
    if pipe.rank == 0:
        torch.save({"ids": ids, "mask": mask, "forward": logits}, os.path.join(out_dir, "quick.pt"))
    distload.dist.shutdown(pipe.world)
    raise SystemExit(0)


if pipe.rank == 0:
    saved = {"ids": ids, "mask": mask, "forward": pipe.forward(ids, mask, micro_batches=2)}
    time.sleep(timeout + 2)  # the others wait through it, with no receive posted
    saved["generate"] = pipe.generate(ids, mask, max_new_tokens=8)
    record["bad_ids"] = error_of(lambda: pipe.forward(ids + vocab))
    record["bad_tokens"] = error_of(lambda: pipe.generate(ids, max_new_tokens=-1))
    saved["stream"] = list(pipe.forward_stream([ids[:2], (ids, mask), ids[3:]], micro_batches=2))
    saved["no_tokens"] = pipe.generate(ids, mask, max_new_tokens=0)
    pipe.close()
    pipe.close()  # again: nothing happens
    torch.save(saved, os.path.join(out_dir, "serve.pt"))
else:
    record["served"] = pipe.serve()
    pipe.close()  # serve() already saw rank 0's close: nothing happens
record["after_close"] = error_of(lambda: pipe.forward(ids if pipe.rank == 0 else None))
with open(os.path.join(out_dir, f"serve_rank{pipe.rank}.json"), "w") as f:
    json.dump(record, f)
distload.dist.shutdown(pipe.world)
