#!/usr/bin/env bash
# One check of vistrain on a GPU machine, from a fresh clone, in under 10 minutes:
#   1. a .venv with a CUDA build of torch (and the dev + Lightning extras);
#   2. the CUDA tests (pytest -m cuda);
#   3. the default experiment for STEPS steps in "32" and "bf16-mixed": img/s, peak memory;
#   4. EMA update and asynchronous checkpoint timings on the GPU;
#   5. a 2-process NCCL run when there are two GPUs or more.
# A compact summary is printed at the end; full logs are under $OUT_DIR.
#
# Usage: benchmarks/gpu_check.sh
# Environment:
#   PYTHON           interpreter that creates .venv (default python3)
#   TORCH_INDEX_URL  pip index of the CUDA torch wheels, e.g. https://download.pytorch.org/whl/cu128
#                    (default: PyPI, whose Linux x86-64 wheels are CUDA builds)
#   TORCH_VERSION    torch version to install (default: scripts/setup.sh's pin)
#   STEPS            steps of each default-experiment run (default 300; 50 of them warm-up)
#   WORKERS          data loader workers of those runs (default: cores - 2, at most 8)
#   OUT_DIR          folder of logs and runs (default runs/gpu_check)
#   SKIP_SETUP=1     use the existing environment as it is
#   VENV_PYTHON      the interpreter to check with (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-300}
OUT_DIR=${OUT_DIR:-runs/gpu_check}
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=${WORKERS:-$(( CORES > 10 ? 8 : (CORES > 3 ? CORES - 2 : 1) ))}
PY=${VENV_PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILURES=0

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }
# run NAME SECONDS CMD...: run CMD with a time limit, its output in $OUT_DIR/NAME.log;
# never stops the script (the summary says what failed).
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(elapsed))"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "   ok"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   TIMED OUT after ${limit}s (log: $OUT_DIR/$name.log)"
  else
    echo "   FAILED with exit code $rc (log: $OUT_DIR/$name.log)"
  fi
  [ "$rc" -eq 0 ] || FAILURES=$(( FAILURES + 1 ))
  return "$rc"
}

# ---------------------------------------------------------------- 1. environment
cuda_torch() { [ -x "$PY" ] && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  echo "== setup (at $(elapsed))"
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$(dirname "$(dirname "$PY")")"
  fi
  if ! cuda_torch; then
    # scripts/setup.sh installs torch only when none is there: put a CUDA build in first.
    version=${TORCH_VERSION:-$(sed -n 's/.*TORCH_VERSION:-\([0-9.]*\).*/\1/p' scripts/setup.sh)}
    index_args=()
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      index_args=(--index-url "$TORCH_INDEX_URL")
    fi
    timeout 600 "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip uninstall -q -y torch > /dev/null 2>&1 || true  # a CPU build would satisfy the pin
    timeout 900 "$PY" -m pip install -q "torch==${version}" ${index_args[@]+"${index_args[@]}"}
  fi
  EXTRAS=dev,pl timeout 900 scripts/setup.sh
fi
if ! cuda_torch; then
  echo "gpu_check.sh: error: $PY has no CUDA torch (torch.cuda.is_available() is False)." >&2
  echo "  Check nvidia-smi, or reinstall with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" >&2
  exit 2
fi
NUM_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || NUM_GPUS=1
note "$("$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, ' f'{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}')"), $CORES cores"

# ---------------------------------------------------------------- 2. CUDA tests
if run cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/cuda; then :; fi
note "cuda tests: $(grep -E '(passed|failed|error|skipped)' "$OUT_DIR/cuda_tests.log" | tail -n 1 || echo 'no result')"

# ---------------------------------------------------------------- 3. default experiment
for precision in 32 bf16-mixed; do
  name="fit_${precision}"
  if run "$name" 150 "$PY" benchmarks/gpu_fit.py --precision "$precision" --steps "$STEPS" \
      --warmup 50 --workers "$WORKERS" --output-dir "$OUT_DIR/$name"; then
    note "yolox_shapes $precision: $(tail -n 1 "$OUT_DIR/$name.log")"
  else
    note "yolox_shapes $precision: FAILED (see $OUT_DIR/$name.log)"
  fi
done

# ---------------------------------------------------------------- 4. EMA and checkpoints
if run ema 60 "$PY" benchmarks/ema.py --device cuda --rounds 40; then
  note "ema (cuda): $(grep -E 'goal' "$OUT_DIR/ema.log" | tail -n 1)"
else
  note "ema (cuda): FAILED (see $OUT_DIR/ema.log)"
fi
if run checkpoint 90 "$PY" benchmarks/checkpoint.py --device cuda --rounds 5 --batch 32 --size 128; then
  note "checkpoint (cuda, ms):"
  { grep -A 3 -E '^ *threads' "$OUT_DIR/checkpoint.log" || true; } | sed 's/^/    /' | tee -a "$SUMMARY"
else
  note "checkpoint (cuda): FAILED (see $OUT_DIR/checkpoint.log)"
fi

# ---------------------------------------------------------------- 5. two processes, NCCL
if [ "$NUM_GPUS" -ge 2 ]; then
  nccl_start=$(date +%s)
  if run nccl_2proc 150 "$PY" -m vistrain fit --devices 2 --config toy_classifier \
      --output-dir "$OUT_DIR/nccl_2proc" --set num_epochs=2 --set batch_size=16; then
    note "2-process NCCL toy_classifier, 2 epochs: ok in $(( $(date +%s) - nccl_start ))s"
  else
    note "2-process NCCL toy_classifier: FAILED (see $OUT_DIR/nccl_2proc.log)"
  fi
else
  note "2-process NCCL: skipped ($NUM_GPUS GPU)"
fi

echo
echo "================ gpu_check summary ($(elapsed), $FAILURES step(s) failed) ================"
cat "$SUMMARY"
[ "$FAILURES" -eq 0 ]
