#!/usr/bin/env bash
# scripts/gpu_check.sh RESULTS_DIR — the whole GPU check in one run, on a machine with a CUDA GPU,
# within GPU_CHECK_BUDGET seconds (default 450: a lent device's 8 minutes, less start-up). Most
# important first: build for this GPU's own arch, the kernels' self-check, the `cuda`-marked tests
# (parity, the real-size attention), compute-sanitizer over every kernel at small shapes, the op
# benchmarks, then the model benchmarks while time is left. Each step has its own time limit (never
# past the budget) so one hang cannot eat the rest; a step without time left is skipped (rc 125).
# Logs and JSON go to RESULTS_DIR; summary.json has each step's rc and seconds. Works with the
# machine's own python/torch (torch >= 2.11, triton >= 3.6); no network needed.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-450}))
# this GPU's arch only (e.g. "9.0"): a third of the build of the shipped 8.0;9.0+PTX list
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-8.0;9.0}}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd) && export CUDA_HOME
fi
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)

declare -A RC SECS
ORDER=()
step() {  # step NAME LIMIT_S CMD...: run under its limit (capped by the budget), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS)) start=$SECONDS
  ORDER+=("$name")
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
    RC[$name]=125; SECS[$name]=0; return
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - start))
  tail -n 5 "$OUT/$name.log"
  echo "== $name: rc=${RC[$name]} in ${SECS[$name]}s$([ "${RC[$name]}" = 124 ] && echo ' (time limit)')"
}

# build in place (no pip: the machine's python may be externally managed); the steps import from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step build 240 env COGVX_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
step info 30 "$PY" -m cogvx_kernels.info
# every backend of every op against the reference at small odd shapes, forward and backward
step self_check 60 "$PY" -m cogvx_kernels.info --check --device cuda
# attention parity vs fp64 SDPA (D 64/128, odd Lq != Lk, layouts, LSE, backward, determinism), the
# real 17,776-token size, conv beyond 2^31 elements, rope / qk-norm views
step cuda_tests 150 "$PY" -m pytest -q -x -m cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests
# races, barriers and out-of-bounds accesses in every kernel: the quick self-check's small shapes
for tool in memcheck racecheck synccheck; do
  if [ -n "$SANITIZER" ]; then
    step "sanitizer_$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "$PY" -m cogvx_kernels.info --check --quick --device cuda
  else
    echo "== sanitizer_$tool: skipped, no compute-sanitizer" | tee "$OUT/sanitizer_$tool.log"
    ORDER+=("sanitizer_$tool"); RC[sanitizer_$tool]=125; SECS[sanitizer_$tool]=0
  fi
done
step triton_aot 30 "$PY" -m cogvx_kernels.triton.aot --json "$OUT/triton_aot.json"
step benchmarks 90 "$PY" benchmarks/run.py --device cuda --backward --quick --op causal_conv3d --op rope3d \
  --op qk_norm_rope3d --op joint_attention --json "$OUT/benchmarks.json" --png "$OUT/benchmarks.png"
# while time is left: the model at the real 17,776-token sequence (inference), the VAE at 49x480x720,
# one VAE training step at 17x256x256, a whole 2B generation (4 DPM steps with CFG)
step transformer_bench 90 "$PY" benchmarks/run.py --device cuda --quick --op transformer --json "$OUT/transformer.json"
step vae_bench 90 "$PY" benchmarks/run.py --device cuda --quick --op vae --json "$OUT/vae.json"
step vae_train_bench 60 "$PY" benchmarks/run.py --device cuda --quick --op vae_train --json "$OUT/vae_train.json"
step pipeline_bench 90 "$PY" benchmarks/run.py --device cuda --quick --op pipeline --json "$OUT/pipeline.json"

{
  echo "{"
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)\","
  echo "  \"arch_list\": \"$TORCH_CUDA_ARCH_LIST\","
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"steps\": {"
  first=1
  for name in "${ORDER[@]}"; do
    [ $first = 1 ] || echo ","
    first=0
    printf '    "%s": {"rc": %s, "seconds": %s}' "$name" "${RC[$name]}" "${SECS[$name]}"
  done
  echo
  echo "  }"
  echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
for name in "${ORDER[@]}"; do [ "${RC[$name]}" = 0 ] || [ "${RC[$name]}" = 125 ] || exit 1; done
