#!/usr/bin/env bash
# The GPU checks of issue 14, on a CUDA machine, in under 8 minutes, with one summary table:
#
#   1. the CUDA tests (pytest -m cuda: pinned staging ring, device-side cast, H2D overlap,
#      GPU loads, the offload tiers on a GPU);
#   2. a generated multi-GB checkpoint (scripts/make_checkpoint.py --preset 4gb);
#   3. the read path into every visible GPU against a raw read of the same bytes, warm and
#      cold, threads 1/2/4/8, with and without O_DIRECT (bench_load.py --staged --device cuda);
#   4. distload.load of it on every visible GPU (one rank each), warm, cold and cold with
#      O_DIRECT: per-rank and per-node GB/s, time, staging and pinned memory, and every
#      tensor checked bit for bit against safetensors;
#   5. forward and generate on the GPU ranks (nccl with 2+ GPUs) against transformers.
#
# Usage: scripts/gpu_check.sh [RESULTS]      (default ./gpu-check-results)
# Environment: PYTHON (python3), GPU_CHECK_WORK (/tmp/distload-gpu-check: checkpoints,
# logs), GPU_CHECK_PRESET (4gb), GPU_CHECK_REPEATS (2), GPU_CHECK_CPU=1 (a dry run of the
# plumbing on CPU ranks where no GPU is: every GPU figure is then a CPU one, and the CUDA
# tests skip), GPU_CHECK_NO_INSTALL=1 (PYTHONPATH only: leave an editable install alone).
# It installs distload itself (pip install -e '.[test]', offline, never touching torch;
# falls back to PYTHONPATH). Exit status 0 when every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS=$(mkdir -p "${1:-$ROOT/gpu-check-results}" && cd "${1:-$ROOT/gpu-check-results}" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/distload-gpu-check}
PRESET=${GPU_CHECK_PRESET:-4gb}
REPEATS=${GPU_CHECK_REPEATS:-2}
PY=${PYTHON:-python3}
LOGS=$WORK/logs
mkdir -p "$WORK" "$LOGS"
rm -f "$RESULTS"/steps.tsv "$RESULTS"/*.json "$RESULTS"/*.xml "$RESULTS"/summary.txt
export HF_HUB_OFFLINE=1 DISTLOAD_CACHE=$WORK/cache PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS CMD...: run under a time limit; log, rc and seconds recorded
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name"
    timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$RESULTS/steps.tsv"
    tail -n 4 "$LOGS/$name.log"
    return $rc
}

evict() {  # drop the checkpoint's pages from the page cache (no root needed)
    "$PY" -c 'import sys, glob; from distload.io.pagecache import evict
for f in glob.glob(sys.argv[1] + "/*"): evict(f)' "$1"
}

# ---------------------------------------------------------------- 0. what is there
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
    DEVICE=cpu NPROC=2
else
    NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
    if [ "${NPROC:-0}" -lt 1 ]; then
        echo "no CUDA device is visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')):" \
             "nothing to check (GPU_CHECK_CPU=1 runs the plumbing on CPU ranks)" >&2
        exit 2
    fi
    DEVICE=cuda
    nvidia-smi -L || true
fi
echo "devices: $NPROC x $DEVICE; results in $RESULTS; logs in $LOGS"

install() {
    if [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ]; then
        echo "GPU_CHECK_NO_INSTALL=1: using PYTHONPATH=$ROOT"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT[test]" ||
            echo "pip install -e failed (offline, no build isolation): using PYTHONPATH=$ROOT"
    fi
    "$PY" -c '
import importlib.util, torch
need = ["distload", "safetensors", "huggingface_hub", "psutil", "filelock", "pytest", "hypothesis",
        "transformers", "accelerate"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("torch", torch.__version__, "cuda", torch.version.cuda, "| missing:", missing or "none")
raise SystemExit(1 if missing else 0)'
}
make_ckpts() {
    [ -d "$CKPT" ] || "$PY" scripts/make_checkpoint.py "$CKPT" --preset "$PRESET" || return 1
    [ -d "$TINY" ] || "$PY" scripts/make_checkpoint.py "$TINY" --layers 4 --hidden 64 --intermediate 128 \
        --heads 4 --kv-heads 2 --vocab 256 --dtype float32 --shards 3
}
CKPT=$WORK/ckpt-$PRESET
TINY=$WORK/ckpt-tiny
[ -f "$CKPT/config.json" ] || rm -rf "$CKPT"    # a half-made one from an interrupted run
[ -f "$TINY/config.json" ] || rm -rf "$TINY"
export -f install make_ckpts
export PY ROOT CKPT TINY PRESET

step install 150 bash -c install

# ---------------------------------------------------------------- 1. the CUDA tests
# (a CPU dry run collects them too: they skip, and the table says so)
step cuda-tests 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml="$RESULTS/cuda-tests.xml"

# ---------------------------------------------------------------- 2. checkpoints
step checkpoints 200 bash -c make_ckpts

# ---------------------------------------------------------------- 3. the read path vs a raw read
step read-sweep 240 "$PY" scripts/bench_load.py "$CKPT" --staged --device "$DEVICE" --nproc "$NPROC" \
    --cold --repeats "$REPEATS" --threads 1,2,4,8 --direct off,on --json "$RESULTS/read-sweep.json"

# ---------------------------------------------------------------- 4. whole loads, bit-exact
LOADER=(-m torch.distributed.run --standalone "--nproc_per_node=$NPROC" scripts/_gpu_check_load.py)
[ "$DEVICE" = cpu ] && LOADER+=(--device cpu)
cat "$CKPT"/* >/dev/null
step load-warm 120 "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" warm
evict "$CKPT"
step load-cold 150 "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" cold
evict "$CKPT"
step load-cold-direct 150 "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" cold-direct --direct-io

# ---------------------------------------------------------------- 5. forward + generate
step pipeline 150 "$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" \
    scripts/_gpu_check_pipeline.py "$TINY" "$RESULTS" "$DEVICE"

# ---------------------------------------------------------------- the table
tar -czf "$RESULTS/logs.tar.gz" -C "$WORK" logs
echo
"$PY" scripts/_gpu_check_report.py "$RESULTS"
