#!/usr/bin/env bash
# Install, fetch the reference assets (for the smoke tests; they skip if the fetch is impossible), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/fetch_reference_assets.sh || echo "reference assets unavailable: smoke tests will be skipped"
exec .venv/bin/python -m pytest -q "$@"
