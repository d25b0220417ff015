#!/usr/bin/env bash
# Load (and run) a model on every GPU of this node, one process per GPU, through
# python -m distload.launch (torchrun that exits with the failing rank's own code).
#   launch/torchrun.sh --model ./Llama-3-70B --dtype bfloat16 --report load.json
#   launch/torchrun.sh --master_port=29600 -- --model ./Llama-3-70B     # launcher options first
# Arguments before a lone "--" go to the launcher (torchrun's options), the rest to
# distload; without "--", all go to distload. NPROC overrides the process count (default:
# the number of visible GPUs, else 2 CPU ranks).
set -euo pipefail
LAUNCHER_ARGS=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do LAUNCHER_ARGS+=("$1"); shift; done
  shift
fi
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# --standalone unless the launcher options name a rendezvous of their own
RDZV=(--standalone)
for arg in "${LAUNCHER_ARGS[@]}"; do
  case $arg in --rdzv*|--master*|--nnodes*|--node*rank*) RDZV=() ;; esac
done
exec "$PYTHON" -m distload.launch "${RDZV[@]}" --nproc_per_node="$NPROC" "${LAUNCHER_ARGS[@]}" -m distload.load "$@"
