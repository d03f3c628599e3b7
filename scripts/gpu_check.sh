#!/usr/bin/env bash
# The GPU check (about 5-10 minutes on one H100/H200): the quick config's stages on CUDA in bf16, each
# step's wall time and peak GPU memory, and the measured decode speedup (CUDA graphs) of the 1.5x child
# vs the parent -> benchmarks/gpu.md (+ .json). See scripts/gpu_check.py for what it runs.
#
# Needs: a CUDA build of torch, transformers, accelerate, pandas, matplotlib (a GPU image has them); the
# reference assets (bash scripts/fetch_reference_assets.sh, or carry assets/ in); and what the quick config
# uses beyond those: gguf (the GGUF parent), pulp (the solver) and optionally ray (BLD runs in-process
# without it). Nothing heavy is installed: wheels for those, if carried in under wheels/, are installed
# offline (`pip install --no-index --find-links wheels/ gguf pulp ray`).
#   bash scripts/gpu_check.sh              the check
#   bash scripts/gpu_check.sh --dry-run    the generated config and the plan only (any machine, no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("gguf", "pulp", "ray") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ] && [ -d wheels ]; then
    echo "gpu_check: installing $missing from wheels/ (offline)"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --find-links wheels/ $missing || true
    missing=$("$PY" -c 'import importlib.util; print(" ".join(m for m in ("gguf", "pulp") if importlib.util.find_spec(m) is None))')
fi
missing=${missing//ray/}  # optional: BLD runs in this process without it
if [ -n "${missing// /}" ] && [ "${1:-}" != "--dry-run" ]; then
    echo "gpu_check: missing Python packages:$missing; carry their wheels in under wheels/ (pip download $missing -d wheels)" >&2
    exit 2
fi
for asset in assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf assets/corpus/python-docs; do
    if [ ! -e "$asset" ] && [ "${1:-}" != "--dry-run" ]; then
        echo "gpu_check: $asset is missing; run bash scripts/fetch_reference_assets.sh (or carry assets/ in)" >&2
        exit 2
    fi
done
if [ "${1:-}" != "--dry-run" ]; then
    "$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("gpu_check:", torch.cuda.get_device_name() if ok else "no CUDA GPU", "torch", torch.__version__); sys.exit(0 if ok else 2)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" scripts/gpu_check.py "$@"
