"""Under torchrun: `pipe.forward_stream` over several batches of different shapes, a
stream that rank 0 leaves early, one whose batch iterator fails on rank 0, one given a
tensor instead of batches (after each, a plain `pipe.forward` must still work), and one
interrupted on rank 0 by a call that must be refused. Rank 0
saves OUT/stream.pt (inputs and logits); every rank writes OUT/stream_rank<R>.json with
what its loops saw and the errors it got.

    torchrun --nproc_per_node=2 pipeline_stream.py OUT CKPT
"""

import json
import os
import sys

import torch

import distload
from pipeline_inputs import batch, error_of

out_dir, ckpt = sys.argv[1], sys.argv[2]
pipe = distload.load(ckpt, device="cpu")
first = pipe.rank == 0
ids, mask = batch(pipe.plan.config["vocab_size"])
plain = torch.randint(0, pipe.plan.config["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(1))
batches = [(ids, mask), plain, (ids[:2], mask[:2]), {"input_ids": ids[2:], "attention_mask": mask[2:]},
           ids[4]]
record, saved = {"rank": pipe.rank}, {"ids": ids, "mask": mask, "plain": plain}


# 0. no batches at all: every rank's loop ends at once
record["empty"] = len(list(pipe.forward_stream([] if first else None)))

# 1. a whole stream, 2 micro-batches per batch
outputs = list(pipe.forward_stream(batches if first else None, micro_batches=2))
saved["stream"] = outputs
record["stream_none"] = [o is None for o in outputs]

# 2. rank 0 leaves after the first batch; the pipeline must be clean for the next call
seen = []
for logits in pipe.forward_stream(batches[:4] if first else None, micro_batches=2):
    seen.append(logits is None)
    if first:
        break
record["left_early_seen"] = seen
saved["after_break"] = pipe.forward(ids, mask)


# 3. rank 0's batch iterator fails after two batches
def failing():
    yield ids, mask
    yield plain
    raise OSError("cannot read batch 3 of prompts.bin")


got = []


def consume():
    for logits in pipe.forward_stream(failing() if first else None):
        got.append(logits is None)


record["iterator_error"] = error_of(consume)
record["iterator_seen"] = got
saved["after_abort"] = pipe.forward(plain, micro_batches=3)

# 4. a tensor is not a list of batches
record["tensor_error"] = error_of(lambda: list(pipe.forward_stream(ids if first else None)))
saved["after_type_error"] = pipe.forward(plain)

# 5. on rank 0, a call while a stream is still open is refused there (the others are
#    still serving the stream), and the stream then goes on to its end
if first:
    stream = pipe.forward_stream(batches[:3])
    resumed = [next(stream)]
    record["open_stream_error"] = error_of(lambda: pipe.forward(ids))
    resumed += list(stream)
    record["open_stream_batches"] = len(resumed)
else:
    record["open_stream_batches"] = len(list(pipe.forward_stream(None)))

if first:
    torch.save(saved, os.path.join(out_dir, "stream.pt"))
with open(os.path.join(out_dir, f"stream_rank{pipe.rank}.json"), "w") as f:
    json.dump(record, f)
distload.dist.shutdown(pipe.world)
