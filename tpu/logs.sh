#!/usr/bin/env bash
# Stream the log of one worker (WORKER=0 by default; process 0 writes metrics).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
gcloud_tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n 200 -f $REMOTE_DIR/$LOG_FILE"
