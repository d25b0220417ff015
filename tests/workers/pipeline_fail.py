"""Under torchrun: rank FAIL_RANK raises inside its stage during `pipe.forward` or, after a
few decode steps, during `pipe.generate`. Every rank must stop with that error, no hang.

    torchrun --nproc_per_node=2 pipeline_fail.py CKPT forward|generate FAIL_RANK
"""

import sys

import distload
from pipeline_inputs import batch

ckpt, mode, fail_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = distload.load(ckpt, device="cpu")
calls = {"n": 0}
fail_after = 0 if mode == "forward" else 3  # generate: the prefill and a few decode steps go through


def explode(module, args):
    if mode == "generate" and args[0].shape[1] != 1:
        return  # a part of the prompt
    calls["n"] += 1
    if calls["n"] > fail_after:
        raise RuntimeError(f"injected stage failure on rank {pipe.rank}")


if pipe.rank == fail_rank:
    last_layer = max(pipe.module.model.layers, key=int)
    pipe.module.model.layers[last_layer].register_forward_pre_hook(explode)
ids, mask = batch(pipe.plan.config["vocab_size"])
if mode == "forward":
    pipe.forward(ids, mask)
else:
    pipe.generate(ids, mask, max_new_tokens=16)
print(f"rank {pipe.rank} finished without an error", flush=True)
