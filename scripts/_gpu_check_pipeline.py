"""One rank of `scripts/gpu_check.sh`'s pipeline step (under torchrun, one rank per GPU;
nccl between GPU ranks; not for users): a small Llama model loaded by distload onto the
ranks' GPUs, `pipe.forward` and `pipe.generate` on it (also of one prompt alone), and on
rank 0 the same with transformers on its GPU. Rank 0 writes ``OUT/pipeline.json``: the largest logit
difference, whether the generated tokens are equal, and PASS.

    torchrun --nproc_per_node=NGPU scripts/_gpu_check_pipeline.py CKPT OUT [cuda|cpu]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import distload

ATOL = 1e-3   # float32 on both sides, different kernels and orders of reduction
IDS = torch.tensor([[3, 17, 42, 9, 100, 7, 55, 21], [0, 0, 0, 5, 6, 7, 8, 9]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@torch.no_grad()
def main() -> int:
    ckpt, out = sys.argv[1], sys.argv[2]
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"   # cpu: a dry run on CPU ranks
    torch.backends.cuda.matmul.allow_tf32 = False
    pipe = distload.load(ckpt, device=device)
    logits = pipe.forward(IDS, MASK, micro_batches=2)
    tokens = pipe.generate(IDS, MASK, max_new_tokens=8)
    # one prompt, one group in flight: the case that deadlocked on NCCL with 3+ ranks when
    # a middle rank posted its next receive before its sends
    single = pipe.generate(IDS[:1], MASK[:1], max_new_tokens=8)
    if pipe.rank == 0:
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(pipe.device).eval()
        ids, mask = IDS.to(pipe.device), MASK.to(pipe.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hf = ref(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        diff = (logits.to(pipe.device)[real] - hf[real]).abs().max().item()
        hf_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        same = torch.equal(tokens.to(pipe.device), hf_tokens) and \
            torch.equal(single.to(pipe.device), hf_tokens[:1])
        result = {"world_size": pipe.world.world_size, "devices": [r["device"] for r in pipe.job_report["ranks"]],
                  "backend": dist.get_backend() if dist.is_initialized() else "none (one rank)",
                  "logits_device": str(logits.device), "max_abs_diff": diff, "atol": ATOL,
                  "tokens_equal": same, "pass": diff <= ATOL and same}
        with open(os.path.join(out, "pipeline.json"), "w") as f:
            json.dump(result, f)
    distload.dist.shutdown(pipe.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
