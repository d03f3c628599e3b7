#!/usr/bin/env bash
# Build the block library as a job on a running Ray cluster:
#
#   RAY_ADDRESS=http://HEAD:8265 scripts/submit_ray_job.sh runs/R --parent /shared/parent.gguf --workers 8 --threads 4
#
# which runs
#
#   ray job submit --address $RAY_ADDRESS --working-dir . -- puzzle build-library --run-dir /abs/runs/R ...
#
# `--working-dir .` uploads this repository (minus what .gitignore lists: .venv, assets, runs), so the job
# runs this code; every node needs the package's dependencies (the venv, or a runtime env with pip).
# Inside the job `ray.init()` joins the cluster; each layer group is a Ray task. The run directory and
# the parent are read and written by every node: keep them on a shared filesystem and give absolute
# paths (the job's working directory is a temporary copy of this one). Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: scripts/submit_ray_job.sh RUN_DIR [puzzle build-library flags ...]" >&2
  exit 2
fi
RUN_DIR=$(realpath -m "$1")
shift
RAY=${RAY:-ray}
[ -x .venv/bin/ray ] && RAY=.venv/bin/ray
exec "$RAY" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  puzzle build-library --run-dir "$RUN_DIR" "$@"
