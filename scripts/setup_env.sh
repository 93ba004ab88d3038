#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv and builds the kernels.
#   bash scripts/setup_env.sh            # torch 2.14.1 (CUDA 13.0 build) + package + its [test] extra
# The dependencies are declared once, in pyproject.toml. Idempotent: a second run only rebuilds what
# changed. Compiler caching (ccache, outside the clone) makes rebuilding the CUDA kernels cheap
# across fresh clones on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${COGVX_VENV:-.venv}
TORCH_SPEC=${COGVX_TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "$TORCH_SPEC"
# The build runs without isolation, against this torch: install pyproject.toml's build requirements.
"$VENV/bin/python" -c "import tomllib" 2>/dev/null || pip_install tomli   # Python 3.10
pip_install $("$VENV/bin/python" -c '
try:
    import tomllib
except ImportError:
    import tomli as tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
mkdir -p build
# The extras must not replace this torch (torchvision, for one, follows it).
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > build/constraints.txt  # no local label: '<=2.14.1' from another package excludes 2.14.1+cu130

# CUDA toolkit root: the nvcc on PATH may be a wrapper script, so ask nvcc itself.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
  [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd) && export CUDA_HOME
fi

# ccache for the C++ and CUDA compiles (optional: the build works without it).
if ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q ccache >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q ccache >/dev/null 2>&1; }) || true
fi
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/cogvx-ccache} CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
  export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$PWD   # hits across clones in different folders
  # the masquerade directory (gcc/g++ → ccache), not CXX="ccache g++": torch checks the compiler's
  # version by running $CXX
  [ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH"
  [ -n "${CUDA_HOME:-}" ] && export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"
fi

# cubins for sm_80 (every sm_8x) and sm_90, plus sm_90 PTX that newer GPUs (Blackwell) JIT-compile
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "cogvx: installing the package with its [test] extra and building the kernels (log: build/build.log)"
if ! "$VENV/bin/pip" install --disable-pip-version-check --no-build-isolation -c build/constraints.txt -v \
    -e ".[test]" > build/build.log 2>&1; then
  tail -n 40 build/build.log >&2
  echo "cogvx: install or build failed; full log in build/build.log" >&2
  exit 1
fi
"$VENV/bin/python" -c "import torch, numpy, pytest, diffusers" >/dev/null
"$VENV/bin/python" -m cogvx_kernels.info
