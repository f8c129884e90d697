#!/usr/bin/env bash
# Create a TPU VM or pod slice. SPOT=1 asks for spot capacity (cheaper, preemptible:
# pair it with tpu/relaunch.sh).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

args=(create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "${SPOT:-0}" == "1" ]]; then
  args+=(--spot)
fi
gcloud_tpu "${args[@]}"
