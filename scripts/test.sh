#!/usr/bin/env bash
# Install, fetch the reference assets (for the smoke tests; they skip if the fetch is impossible), run pytest.
# No arguments: the whole suite (what CI runs). --fast: only the tests not marked slow (everyday work: no Ray
# heads, torchrun, engine builds, memory calibrations or end-to-end runs). Any other argument goes to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
bash scripts/install.sh
bash scripts/fetch_reference_assets.sh || echo "reference assets unavailable: smoke tests will be skipped"
exec .venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
