#!/usr/bin/env bash
# Start the MLflow tracking server (and UI) over captune's store, bound to 127.0.0.1 only. On a
# cluster (cluster.yaml) it runs on the head and only the head's processes use it: work on other
# nodes records through the driver's MLflow relay (infra/mlflow_relay.py), so it need not listen
# beyond the loopback.
#   mlflow/server.sh                 # http://127.0.0.1:5000, SQLite store mlflow/mlflow.db
#   PORT=5001 mlflow/server.sh
#   BACKEND_URI=postgresql://user@db/mlflow ARTIFACTS=s3://bucket/mlflow mlflow/server.sh   # a team's server
#   CAPTUNE_STORAGE=s3://bucket/captune mlflow/server.sh    # artifacts in $CAPTUNE_STORAGE/mlflow (cluster.yaml sets it)
# Runs logged before from the command line (SQLite store) show up as they are.
# A sweep's leaderboard (the saved view every sweep writes; `captune sweep` prints its address):
#   http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=d3d42189-33f9-5b69-888e-ed5c93741cbf
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
mlflow_bin=${MLFLOW_BIN:-$root/.venv/bin/mlflow}
[ -x "$mlflow_bin" ] || mlflow_bin=mlflow
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
# Without the job runner the server starts in ~4 s and ~0.45 GB instead of ~10 s and 2.3 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
artifacts=${ARTIFACTS:-${CAPTUNE_STORAGE:+$CAPTUNE_STORAGE/mlflow}}
artifacts=${artifacts:-$here/artifacts}
exec "$mlflow_bin" server \
  --backend-store-uri "${BACKEND_URI:-sqlite:///$here/mlflow.db}" \
  --artifacts-destination "$artifacts" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-1}"
