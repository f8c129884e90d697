#!/usr/bin/env bash
# Keep a job alive on spot/preemptible capacity: every INTERVAL seconds, if the slice was
# preempted (or is gone), recreate it, set it up and rerun the command. The trainers resume
# from the last checkpoint in their run directory (put it on gs://), so nothing is lost but
# the steps since that checkpoint.
#   SPOT=1 tpu/relaunch.sh rlaif train --gin_file=... --gin_param="train.run_dir='gs://bucket/run'"
set -euo pipefail
here=$(dirname "$0")
# shellcheck source=tpu/common.sh
source "$here/common.sh"
INTERVAL=${INTERVAL:-300}
MAX_RELAUNCHES=${MAX_RELAUNCHES:-20}

state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --format='value(state)' 2>/dev/null || echo MISSING
}

launches=0
while (( launches < MAX_RELAUNCHES )); do
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    current=MISSING
  else
    current=$(state)
  fi
  case "$current" in
    READY)
      ;;
    *)
      echo "slice state: $current; (re)launching ($((launches + 1))/$MAX_RELAUNCHES)"
      if [[ "$current" != "MISSING" ]]; then
        "$here/delete.sh"
      fi
      "$here/create.sh"
      "$here/setup.sh"
      "$here/run.sh" "$@"
      launches=$((launches + 1))
      ;;
  esac
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    break
  fi
  sleep "$INTERVAL"
done
