#!/usr/bin/env bash
# scripts/gpu_check.sh RESULTS_DIR — the whole GPU check in one run, on a machine with a CUDA GPU:
# builds the extension against the machine's torch, runs the `cuda`-marked tests and the GPU
# benchmarks, and writes JSON (plus logs) to RESULTS_DIR. Every step runs even if an earlier one
# failed; the exit code is non-zero if any failed. Works with the machine's own python/torch
# (torch >= 2.11, triton >= 3.6); no network needed.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd) && export CUDA_HOME
fi

declare -A RC SECS
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember rc and seconds
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - start))
  tail -n 5 "$OUT/$name.log"
  echo "== $name: rc=${RC[$name]} in ${SECS[$name]}s"
}

# build in place (no pip: the machine's python may be externally managed); the steps import from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step build env COGVX_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
step info "$PY" -m cogvx_kernels.info
step cuda_tests "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests
step triton_aot "$PY" -m cogvx_kernels.triton.aot --json "$OUT/triton_aot.json"
step benchmarks "$PY" benchmarks/run.py --device cuda --backward --op causal_conv3d --op rope3d --op qk_norm_rope3d \
  --op joint_attention --json "$OUT/benchmarks.json" --png "$OUT/benchmarks.png"
# the model at the real 17,776-token sequence: inference only (a 42-layer backward would not fit), quick repeats
step transformer_bench "$PY" benchmarks/run.py --device cuda --quick --op transformer --json "$OUT/transformer.json"
# the VAE at 49x480x720 (decode, encode), bf16: time and CUDA peak memory vs diffusers
step vae_bench "$PY" benchmarks/run.py --device cuda --op vae --json "$OUT/vae.json"
# one VAE training step (all losses, both optimisers) at 17x256x256, bf16 autocast, without/with checkpointing
step vae_train_bench "$PY" benchmarks/run.py --device cuda --op vae_train --json "$OUT/vae_train.json"
# end to end: 2B at 49x480x720, 4 DPM steps with CFG, then decode (one warm-up, two timed calls)
step pipeline_bench "$PY" benchmarks/run.py --device cuda --quick --op pipeline --json "$OUT/pipeline.json"

{
  echo "{"
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)\","
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"steps\": {"
  first=1
  for name in build info cuda_tests triton_aot benchmarks transformer_bench vae_bench vae_train_bench pipeline_bench; do
    [ $first = 1 ] || echo ","
    first=0
    printf '    "%s": {"rc": %s, "seconds": %s}' "$name" "${RC[$name]:-null}" "${SECS[$name]:-null}"
  done
  echo
  echo "  }"
  echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
for name in "${!RC[@]}"; do [ "${RC[$name]}" = 0 ] || exit 1; done
