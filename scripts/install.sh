#!/usr/bin/env bash
# Create .venv (if missing) and install puzzle with its test extras. torch is pinned to the CPU build
# of 2.13.0 that lies on this machine's disk; installing it first keeps pip from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# llama.cpp for the GGUF export tests: llama-cpp-python compiles it from its sdist (about 7 minutes on 2 cores),
# so the wheel is built once into a cache outside the checkout and installed from there afterwards. x86-64-v3
# (AVX2/FMA/F16C) instead of -march=native: a cached wheel must run on any machine that finds it.
LLAMA_CPP_PYTHON=0.3.36
WHEELS=${PUZZLE_WHEEL_CACHE:-$HOME/.cache/puzzle/wheels}
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_PYTHON-*.whl >/dev/null 2>&1; then
    mkdir -p "$WHEELS"
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON (llama.cpp from source) into $WHEELS"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv/bin/python -m pip wheel --quiet --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -w "$WHEELS"
  fi
  .venv/bin/python -m pip install --quiet "$WHEELS"/llama_cpp_python-$LLAMA_CPP_PYTHON-*.whl
fi
echo "installed: $(.venv/bin/python -c 'import torch, transformers, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__)')"
