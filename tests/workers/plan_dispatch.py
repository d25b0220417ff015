"""Under torchrun: the accelerate workflow with device_map="auto" takes the distributed
path. Each rank checks its stage's parameters against safetensors' own reader and writes
OUT/rank{R}.json; rank 0 saves the pipelined logits to OUT/logits.pt."""

import json
import os
import sys

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import distload

ckpt, out_dir = sys.argv[1], sys.argv[2]
with distload.init_empty_weights():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
pipe = distload.load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_seq_len=16)
assert isinstance(pipe, distload.Pipeline), type(pipe)
stage = pipe.plan.stage(pipe.rank)
metas = {m.name: m.located(pipe.root) for s in pipe.plan.stages for m in s.reads}
mismatches, checked = [], 0
for src in stage.params:
    with safe_open(metas[src.key].file, framework="pt") as f:
        reference = f.get_tensor(src.key)
    checked += 1
    if not torch.equal(pipe.module.get_parameter(src.param), reference):
        mismatches.append(src.param)
logits = pipe.forward(torch.tensor([[1, 5, 9, 200, 3, 7], [4, 4, 8, 15, 16, 23]]))
if pipe.rank == 0:
    torch.save(logits, os.path.join(out_dir, "logits.pt"))
with open(os.path.join(out_dir, f"rank{pipe.rank}.json"), "w") as f:
    json.dump({"units": list(stage.units), "digest": pipe.plan.digest(), "checked": checked,
               "mismatches": mismatches}, f)
distload.dist.shutdown(pipe.world)
