#!/usr/bin/env bash
# The GPU check, in one call of at most 540 s (the step limits add up to that): correctness first, then
# the figures, each step skipped with a line if the one before failed. Writes $OUT/suite.log
# (everything) and $OUT/figures.jsonl (one JSON object per measured figure, appended as each step
# ends, so a run cut short keeps what it measured) and prints a short table last
# (benchmarks/gpu_summary.py).
#
#   a. import check; the attention kernel tests compiled for the GPU (not interpreted)
#   b. benchmarks/attention_kernels.py: prefill vs cuDNN, XLA and jax's shipped mha; paged decode vs XLA and
#      jax's shipped gqa and paged_attention; our kernels at several tile/warp/stage settings
#   c+d. benchmarks/engine_gpu.py engine: the 8B-shaped decode step through the engine's programs at
#      batch 1/16/64 (context 2k) vs the roofline and a plain-XLA weight stream; the chat-mix throughput
#   d'. benchmarks/engine_gpu.py peer: transformers generate on the same shape and batch
#   e. benchmarks/engine_gpu.py parity: the default model's shape, GPU greedy tokens vs the CPU's
#   f. benchmarks/op_probe.py: ragged_dot at Qwen3-30B-A3B decode shapes, fp8 and int8-weight
#      matmuls, for the next work
#
# Runs from a source checkout with the machine's own Python packages (jax with its CUDA plugin,
# flax, tokenizers, torch, transformers); wheels in .whl/ (if any) are installed first.
#   OUT=folder bash benchmarks/gpu_suite.sh   MIX_SECONDS=30 (the chat mix's length); KEEP_GOING=1 runs
#                                             every step even after one failed
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/meshserve-gpu-suite}"
mkdir -p "$OUT"
LOG="$OUT/suite.log"
FIG="$OUT/figures.jsonl"
: >"$LOG"
: >"$FIG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # each step its own process; torch shares the card in one
PY="${PYTHON:-python3}"
MIX_SECONDS="${MIX_SECONDS:-30}"
SMOKE=()  # SMOKE_RUN=1: tiny shapes on whatever backend there is, to check this script on a CPU
PLATFORM=cuda
if [ -n "${SMOKE_RUN:-}" ]; then SMOKE=(--smoke); PLATFORM=cpu; fi

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

failed=""
step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, keep its FIGURES lines
  local name="$1" limit="$2"
  shift 2
  if [ -n "$failed" ]; then
    echo "== $name: skipped ($failed failed)" | tee -a "$LOG"
    echo "{\"part\": \"skipped\", \"step\": \"$name\"}" >>"$FIG"
    return
  fi
  echo "== $name" | tee -a "$LOG"
  local t0=$SECONDS part="$OUT/step.log"
  timeout --kill-after=5 "$limit" "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$LOG"
  grep '^FIGURES ' "$part" | sed 's/^FIGURES //' >>"$FIG"
  rm -f "$part"
  echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  echo "{\"part\": \"step\", \"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$FIG"
  if [ $rc -ne 0 ] && [ -z "${KEEP_GOING:-}" ]; then
    failed="$name"
    tail -n 15 "$LOG"
  fi
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$LOG" 2>&1
step "a. import check" 30 "$PY" -c "
import source_tree, jax, jax.numpy as jnp
from meshserve.runtime.engine import Engine
from meshserve.runtime.kernels.paged_decode import paged_decode
from meshserve.serving.versions import describe
print('versions:', describe())
print('jax', jax.__version__, jax.default_backend(), jax.devices())
assert jax.default_backend() == '$([ "$PLATFORM" = cuda ] && echo gpu || echo cpu)', 'not the backend asked for'
"
# Every test compiles its kernel: spread over 8 processes where pytest-xdist is installed (the GPU
# machine has it); the smoke run takes one kind of case (interpreted kernels are slow).
KERNEL_TESTS=(-q -p no:cacheprovider tests/runtime/kernels/test_attention_kernels.py)
if [ -n "${SMOKE_RUN:-}" ]; then KERNEL_TESTS+=(-k "f32 and gqa3");
elif "$PY" -c "import xdist" 2>/dev/null; then KERNEL_TESTS+=(-n 8); fi
step "a. kernel tests on the GPU" 100 env JAX_PLATFORMS=$PLATFORM "$PY" -c "
import sys, source_tree, pytest
sys.exit(pytest.main(sys.argv[1:]))
" "${KERNEL_TESTS[@]}"
step "b. attention kernels" 90 "$PY" benchmarks/attention_kernels.py --iters 30 "${SMOKE[@]}"
step "c+d. 8B engine: decode step and chat mix" $((MIX_SECONDS + 110)) "$PY" benchmarks/engine_gpu.py engine \
  --seconds "$MIX_SECONDS" "${SMOKE[@]}"
step "d. transformers generate, same shape" 80 "$PY" benchmarks/engine_gpu.py peer "${SMOKE[@]}"
step "e. default model shape, GPU vs CPU" 40 "$PY" benchmarks/engine_gpu.py parity "${SMOKE[@]}"
step "f. next ops: ragged_dot, fp8, int8" 60 "$PY" benchmarks/op_probe.py "${SMOKE[@]}"

"$PY" benchmarks/gpu_summary.py "$FIG" | tee -a "$LOG"
