#!/usr/bin/env bash
# Delete the TPU VM (checkpoints and records on gs:// stay).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
gcloud_tpu delete "$TPU_NAME" --quiet
