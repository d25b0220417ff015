#!/usr/bin/env bash
# The GPU checks of issue 14, on a CUDA machine, in under 8 minutes, with one summary table:
#
#   0. its models planned for every world size from 1 to max(8, GPUs), from headers alone
#      (each later step runs one rank per GPU: a model too small to split fails here);
#   1. the CUDA tests (pytest -m cuda: pinned staging ring, device-side cast, H2D overlap,
#      GPU loads, the offload tiers on a GPU);
#   2. a generated multi-GB checkpoint (scripts/make_checkpoint.py --preset 4gb);
#   3. the read path into every visible GPU against a raw read of the same bytes, warm and
#      cold, threads 1/4, with and without O_DIRECT (bench_load.py --staged --device cuda),
#      about 10 reads of the checkpoint, 7 of them from the disk;
#   4. distload.load of it on every visible GPU (one rank each), warm, cold and cold with
#      O_DIRECT: per-rank and per-node GB/s, time, staging and pinned memory, and every
#      tensor checked bit for bit against safetensors;
#   5. forward and generate on the GPU ranks (nccl with 2+ GPUs) against transformers.
#
# Every step runs under its own time limit (BUDGET below); the limits add up to the whole
# check's, LIMIT, which the table holds the run to. "Cold" reads need the checkpoint on a
# disk: the work directory is the first of GPU_CHECK_WORK, /var/tmp/distload-gpu-check and
# ./.gpu-check-work that is not a RAM file system (tmpfs keeps every page cached), and the
# table says where it was.
#
# Usage: scripts/gpu_check.sh [RESULTS]      (default ./gpu-check-results)
# Environment: PYTHON (python3), GPU_CHECK_WORK (checkpoints, logs), GPU_CHECK_PRESET (4gb),
# GPU_CHECK_REPEATS (1), GPU_CHECK_CPU=1 (a dry run of the plumbing on CPU ranks where no
# GPU is: every GPU figure is then a CPU one, and the CUDA tests skip), GPU_CHECK_NPROC
# (ranks of a CPU dry run, 2), GPU_CHECK_STEPS (a space-separated subset of the steps to
# run, e.g. "plan"), GPU_CHECK_NO_INSTALL=1 (PYTHONPATH only: leave an editable install
# alone). It installs distload itself (pip install -e '.[test]', offline, never touching
# torch; falls back to PYTHONPATH). Exit status 0 when every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS=$(mkdir -p "${1:-$ROOT/gpu-check-results}" && cd "${1:-$ROOT/gpu-check-results}" && pwd)
PRESET=${GPU_CHECK_PRESET:-4gb}
REPEATS=${GPU_CHECK_REPEATS:-1}
PY=${PYTHON:-python3}
ONLY=${GPU_CHECK_STEPS:-}

# The whole check's limit and each step's share of it (seconds); they add up to LIMIT.
LIMIT=480
BUDGET=(install:20 plan:30 cuda-tests:90 checkpoints:45 read-sweep:110
        load-warm:45 load-cold:45 load-cold-direct:45 pipeline:50)

fs_type() { stat -f -c %T "$1" 2>/dev/null || echo unknown; }
pick_work() {  # the first candidate that is not in RAM (GPU_CHECK_WORK as given, if set)
    local d
    if [ -n "${GPU_CHECK_WORK:-}" ]; then echo "$GPU_CHECK_WORK"; return; fi
    for d in /var/tmp/distload-gpu-check "$ROOT/.gpu-check-work"; do
        mkdir -p "$d" 2>/dev/null || continue
        case $(fs_type "$d") in tmpfs|ramfs) continue ;; esac
        echo "$d"
        return
    done
    echo "$ROOT/.gpu-check-work"
}
WORK=$(pick_work)
LOGS=$WORK/logs
mkdir -p "$WORK" "$LOGS"
rm -f "$RESULTS"/steps.tsv "$RESULTS"/budget.tsv "$RESULTS"/*.json "$RESULTS"/*.xml "$RESULTS"/summary.txt
printf 'work\t%s\t%s\n' "$WORK" "$(fs_type "$WORK")" >"$RESULTS/budget.tsv"
printf 'limit\t%s\n' "$LIMIT" >>"$RESULTS/budget.tsv"
for b in "${BUDGET[@]}"; do printf 'step\t%s\t%s\n' "${b%%:*}" "${b##*:}" >>"$RESULTS/budget.tsv"; done
export HF_HUB_OFFLINE=1 DISTLOAD_CACHE=$WORK/cache PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

budget() {  # budget NAME: the step's limit in seconds
    local b
    for b in "${BUDGET[@]}"; do [ "${b%%:*}" = "$1" ] && { echo "${b##*:}"; return; }; done
    echo "no budget for step $1" >&2
    exit 2
}

step() {  # step NAME CMD...: run under its limit (BUDGET); log, rc and seconds recorded
    local name=$1 limit t0=$SECONDS rc
    limit=$(budget "$name")
    shift
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== $name (limit ${limit} s)"
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
    DEVICE=cpu NPROC=${GPU_CHECK_NPROC:-2}
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
echo "devices: $NPROC x $DEVICE; results in $RESULTS; work in $WORK ($(fs_type "$WORK")); logs in $LOGS"

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
# The pipeline's model: a layer per rank at least (units = layers + embed, norm, head).
MAX_RANKS=$((NPROC > 8 ? NPROC : 8))
TINY_ARGS=(--layers "$MAX_RANKS" --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 256
           --dtype float32 --shards 3)
make_ckpts() {
    [ -d "$CKPT" ] || "$PY" scripts/make_checkpoint.py "$CKPT" --preset "$PRESET" || return 1
    [ -d "$TINY" ] || "$PY" scripts/make_checkpoint.py "$TINY" "${TINY_ARGS[@]}"
}
CKPT=$WORK/ckpt-$PRESET
TINY=$WORK/ckpt-tiny-$MAX_RANKS
[ -f "$CKPT/config.json" ] || rm -rf "$CKPT"    # a half-made one from an interrupted run
[ -f "$TINY/config.json" ] || rm -rf "$TINY"
export -f install make_ckpts
export PY ROOT CKPT TINY PRESET WORK RESULTS DEVICE MAX_RANKS
export TINY_ARGS_STR="${TINY_ARGS[*]}"

step install bash -c install

# ---------------------------------------------------------------- 0. plans for 1..MAX_RANKS
# headers over sparse files, planned for 1..MAX_RANKS ranks: nothing read, nothing allocated
mkdir -p "$WORK/plan-headers"
step plan "$PY" scripts/_gpu_check_plan.py "$RESULTS" "$DEVICE" "$MAX_RANKS" "$WORK/plan-headers" \
    "$PRESET=--preset $PRESET" "tiny=${TINY_ARGS[*]}"

# ---------------------------------------------------------------- 1. the CUDA tests
# (a CPU dry run collects them too: they skip, and the table says so)
step cuda-tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml="$RESULTS/cuda-tests.xml"

# ---------------------------------------------------------------- 2. checkpoints
step checkpoints bash -c 'TINY_ARGS=($TINY_ARGS_STR); make_ckpts'

# ---------------------------------------------------------------- 3. the read path vs a raw read
# Threads 1 and 4, O_DIRECT off and on, warm and cold: ~10 reads of the checkpoint, 7 from
# the disk (O_DIRECT bypasses the page cache even when warm), per repeat.
step read-sweep "$PY" scripts/bench_load.py "$CKPT" --staged --device "$DEVICE" --nproc "$NPROC" \
    --cold --repeats "$REPEATS" --threads 1,4 --direct off,on --json "$RESULTS/read-sweep.json"

# ---------------------------------------------------------------- 4. whole loads, bit-exact
LOADER=(-m torch.distributed.run --standalone "--nproc_per_node=$NPROC" scripts/_gpu_check_load.py)
[ "$DEVICE" = cpu ] && LOADER+=(--device cpu)
warm() { [ -z "$ONLY" ] || [[ " $ONLY " == *" load-warm "* ]] && cat "$CKPT"/* >/dev/null; }
cold() { [ -z "$ONLY" ] || [[ " $ONLY " == *" load-cold"* ]] && evict "$CKPT"; }
warm
step load-warm "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" warm
cold
step load-cold "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" cold
cold
step load-cold-direct "$PY" "${LOADER[@]}" "$CKPT" "$RESULTS" cold-direct --direct-io

# ---------------------------------------------------------------- 5. forward + generate
step pipeline "$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" \
    scripts/_gpu_check_pipeline.py "$TINY" "$RESULTS" "$DEVICE"

# ---------------------------------------------------------------- the table
[ -z "$ONLY" ] && tar -czf "$RESULTS/logs.tar.gz" -C "$WORK" logs
echo
"$PY" scripts/_gpu_check_report.py "$RESULTS"
