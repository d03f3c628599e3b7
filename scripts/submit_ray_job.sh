#!/usr/bin/env bash
# Run the whole pipeline as one job on a running Ray cluster:
#
#   RAY_ADDRESS=http://HEAD:8265 scripts/submit_ray_job.sh configs/my_run.yaml s3://bucket/runs/my_run [puzzle run flags ...]
#
# which runs
#
#   ray job submit --address $RAY_ADDRESS --working-dir . -- puzzle run CONFIG --run-dir RUN_DIR [flags ...]
#
# `--working-dir .` uploads this repository (minus what .gitignore lists: .venv, assets, runs), so the job
# runs this code; every node needs the package's dependencies (the venv, or a runtime env with pip). Inside
# the job RAY_ADDRESS is set, so `build-library` and `score` (workers: auto) run one Ray task per GPU of
# the cluster (per --threads CPUs on a CPU-only one); the other stages run in the job's driver process.
# RUN_DIR: where the run lives, an absolute path on the driver's node or an fsspec URI (s3://, gs://, ...;
# its fsspec package installed): the job's working directory is a temporary copy, so a relative run
# directory would vanish with it. No filesystem needs to be shared: Ray workers get their inputs and return
# their results through Ray's object store. The config's parent and corpus must be absolute paths on the
# driver's node; the parent must also be at that path on every node (the preflight checks it). Rerunning
# resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: scripts/submit_ray_job.sh CONFIG.yaml RUN_DIR [puzzle run flags ...]" >&2
  exit 2
fi
CONFIG=$1
RUN_DIR=$2
shift 2
case "$RUN_DIR" in
  *://*) ;;  # an fsspec URI, passed as it is
  *) RUN_DIR=$(realpath -m "$RUN_DIR") ;;
esac
RAY=${RAY:-ray}
[ "$RAY" = ray ] && [ -x .venv/bin/ray ] && RAY=.venv/bin/ray
exec "$RAY" job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  puzzle run "$CONFIG" --run-dir "$RUN_DIR" "$@"
