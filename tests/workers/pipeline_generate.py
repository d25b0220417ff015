"""Under torchrun: `pipe.generate` on a checkpoint: greedy (16 new tokens, groups =
world size), greedy with EOS id EOS, both again with more groups than in flight, and
sampling twice with one seed and once with another. Rank 0 saves OUT/generate.pt; the other ranks check they got None.

    torchrun --nproc_per_node=2 pipeline_generate.py OUT CKPT EOS
"""

import os
import sys

import torch

import distload
from distload.pipeline.schedules.ring_decode import pipeline_generate
from pipeline_inputs import batch

out_dir, ckpt, eos = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = distload.load(ckpt, device="cpu")
ids, mask = batch(pipe.plan.config["vocab_size"])
world = pipe.world.world_size
sample = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=12)
results = {
    "greedy": pipe.generate(ids, mask, max_new_tokens=16),
    "greedy_groups3": pipeline_generate(pipe, ids, mask, max_new_tokens=16, micro_batches=3),
    "eos": pipeline_generate(pipe, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0),
    # more groups than in flight: a group that is done makes room for the next
    "eos_refill": pipe.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                                micro_batches=2, group_size=2),
    "greedy_refill": pipe.generate(ids, mask, max_new_tokens=16, group_size=1),
    "sample_a": pipeline_generate(pipe, ids, mask, seed=7, **sample),
    "sample_b": pipeline_generate(pipe, ids, mask, seed=7, micro_batches=world + 1, **sample),
    "sample_c": pipeline_generate(pipe, ids, mask, seed=8, **sample),
}
if pipe.rank == 0:
    torch.save({"ids": ids, "mask": mask, **results}, os.path.join(out_dir, "generate.pt"))
else:
    assert all(v is None for v in results.values()), "ranks other than 0 must get None"
distload.dist.shutdown(pipe.world)
