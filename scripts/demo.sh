#!/usr/bin/env bash
# The main job on the reference parent, end to end, on this machine (embedded local Ray, no server):
# install, fetch SmolLM2-135M-Instruct + the Python-docs corpus, then `puzzle run configs/smollm2_quick.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/fetch_reference_assets.sh
exec .venv/bin/puzzle run configs/smollm2_quick.yaml "$@"
