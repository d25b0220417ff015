"""Under torchrun: load CKPT with half of each rank's layers on TIER (or none), run the
pipelined forward and generate, and save rank 0's logits and tokens and every rank's
report to OUT/rank{R}.pt.

    torchrun --nproc_per_node=2 offload_pipeline.py CKPT OUT OFFLOAD_DIR disk|all-disk|cpu|none

(`all-disk`: every unit, embedding and head included, on the disk tier.)"""

import os
import sys

import torch

import distload
from offload_common import install_tiers

ckpt, out, offload_dir, tier = sys.argv[1:5]
if tier != "none":
    install_tiers(tier.removeprefix("all-"), everything=tier.startswith("all-"))
pipe = distload.load(ckpt, device="cpu", offload_dir=offload_dir)
ids = torch.tensor([[3, 17, 42, 9, 100, 7, 55, 21], [0, 0, 0, 5, 6, 7, 8, 9]])
mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
with torch.no_grad():
    logits = pipe.forward(ids, mask, micro_batches=2)
    tokens = pipe.generate(ids, mask, max_new_tokens=6)
streamed = [n for n, p in pipe.module.named_parameters() if p.is_meta]
torch.save({"logits": logits, "tokens": tokens, "report": dict(pipe.report), "streamed": streamed},
           os.path.join(out, f"rank{pipe.rank}.pt"))
distload.dist.shutdown(pipe.world)
