#!/usr/bin/env bash
# Reproducible Python venv for the local-model reference data and baseline benchmarks:
# torch (CPU use of PyPI's wheel), sentence-transformers, llama-cpp-python (built from source).
#
#   bench/local/setup.sh            # venv at ${SWITCHYARD_BENCH_VENV:-<repo>/.venv-bench}
#
# Only PyPI is needed. Idempotent: when the venv already has everything (stamp file
# matches this script + the lock file), it does nothing.
#
# Why not `pip install torch sentence-transformers`: PyPI's only linux/x86_64 torch wheel
# is the CUDA build, which pulls ~3 GB of nvidia-*/cuda-toolkit/triton wheels, and with
# `--no-deps` it does not import (libtorch_cpu.so itself needs libcudart.so.13). So torch
# and everything else is installed `--no-deps` from requirements-bench.txt (a complete,
# pinned closure without the CUDA packages), and torch_cuda_stubs.py builds tiny stub
# libraries for the missing CUDA sonames (no function in them is ever called on CPU;
# torch.cuda.is_available() is False).
#
# llama-cpp-python is built from the sdist with the pinned cmake/ninja/scikit-build-core from
# the lock file (no build isolation), CPU only, GGML_NATIVE (tuned to this CPU: AVX2/FMA/F16C).
# Needs gcc/g++, nm/readelf (binutils): present on the project's machines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SWITCHYARD_BENCH_VENV:-$repo/.venv-bench}"
py="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION=0.3.36

log() { printf '[bench-setup] %s\n' "$*" >&2; }

stamp_value="$(cat "$here/setup.sh" "$here/requirements-bench.txt" "$here/torch_cuda_stubs.py" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.switchyard-bench-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] \
   && "$venv/bin/python" -c 'import torch, sentence_transformers, llama_cpp' 2>/dev/null; then
  log "venv $venv is up to date"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv ($("$py" --version))"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip_() { "$vpy" -m pip --disable-pip-version-check "$@"; }

log "installing the pinned closure (--no-deps) from requirements-bench.txt"
pip_ install -q --no-deps -r "$here/requirements-bench.txt"

log "building CUDA stub libraries for torch"
site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$vpy" "$here/torch_cuda_stubs.py" "$site"
"$vpy" -c 'import torch; assert not torch.cuda.is_available(); x = torch.ones(4, 4); assert float((x @ x).sum()) == 64.0'

if ! "$vpy" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
  log "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from source (CPU; takes a few minutes)"
  PATH="$venv/bin:$PATH" \
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    pip_ install --no-deps --no-build-isolation --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

"$vpy" - <<'PY'
import importlib.metadata as md
import llama_cpp, sentence_transformers, torch, transformers
print("[bench-setup] ok: torch", torch.__version__, "sentence-transformers", sentence_transformers.__version__,
      "transformers", transformers.__version__, "llama-cpp-python", llama_cpp.__version__,
      "cmake", md.version("cmake"))
PY
printf '%s\n' "$stamp_value" > "$stamp"
log "venv size: $(du -sh "$venv" | cut -f1)"
