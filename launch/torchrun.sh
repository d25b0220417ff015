#!/usr/bin/env bash
# Load (and run) a model on every GPU of this node, one process per GPU.
#   launch/torchrun.sh --model ./Llama-3-70B --dtype bfloat16 --report load.json
# NPROC overrides the process count (default: the number of visible GPUs, else 2 CPU ranks).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc_per_node="$NPROC" -m distload.load "$@"
