#!/usr/bin/env bash
# Sets up the environment and runs the main job. Until the video generator lands this is a demo
# of the ops: python -m cogvx_kernels.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m cogvx_kernels.demo "$@"
