"""Under torchrun: load each checkpoint given in turn (one process, `distload.load` called
again and again), run `pipe.forward` on a left-padded batch (one micro-batch per rank) and
greedy `pipe.generate` for 12 tokens (no EOS). With ``--disk CKPT`` (repeatable), finally
load each such CKPT with half of each stage's layers on the disk tier and do the same.
``--dtype NAME`` loads every checkpoint in that dtype (a quantized one decodes to it;
default: as stored). Rank 0 saves OUT/results.pt: per checkpoint name, its logits, tokens,
job report, the checkpoint's tensor bytes, each stage's units and decoded keys, and the
plain (not decoded) bytes placed on the disk tier.

    torchrun --nproc_per_node=2 arch_pipeline.py OUT [--dtype float32] [--disk CKPT ...] CKPT [CKPT ...]
"""

import os
import sys

import torch

import distload
from offload_common import install_tiers
from tests.archs import left_padded_batch

args = sys.argv[1:]
out_dir = args.pop(0)
dtype, disks = None, []
while args and args[0] in ("--disk", "--dtype"):   # --disk is repeatable
    if args[0] == "--disk":
        disks.append(args[1])
    else:
        dtype = args[1]
    args = args[2:]
ids, mask = left_padded_batch()
results, pipe = {}, None


def run(ckpt: str, name: str, **kw) -> None:
    global pipe
    pipe = distload.load(ckpt, device="cpu", dtype=dtype, **kw)
    with torch.no_grad():
        logits = pipe.forward(ids, mask, micro_batches=pipe.world.world_size)
        tokens = pipe.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    if pipe.rank == 0:
        results[name] = {"logits": logits, "tokens": tokens, "job_report": pipe.job_report,
                         "checkpoint_bytes": pipe.plan.checkpoint_bytes,
                         "units": [list(s.units) for s in pipe.plan.stages],
                         "decoded": [sorted(s.decode) for s in pipe.plan.stages],
                         "plain_on_disk": sum(m.length for s in pipe.plan.stages for m in s.reads
                                              for p in s.params if p.key == m.name and p.tier == "disk"
                                              and p.key not in s.decode)}
    else:
        assert logits is None and tokens is None, "ranks other than 0 must get None"


for ckpt in args:
    run(ckpt, os.path.basename(ckpt))
if disks:
    install_tiers("disk")
for disk in disks:
    run(disk, os.path.basename(disk) + "@disk", offload_dir=os.path.join(out_dir, "offload"))
if pipe.rank == 0:
    torch.save(results, os.path.join(out_dir, "results.pt"))
distload.dist.shutdown(pipe.world)
