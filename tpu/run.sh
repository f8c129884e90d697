#!/usr/bin/env bash
# Run a command on every worker at once, in the background, logging to $LOG_FILE on each.
# RLAIF_DISTRIBUTED=1 makes the scripts call jax.distributed.initialize(), which discovers
# the slice's coordinator and process ids on Cloud TPU by itself.
#   tpu/run.sh rlaif train --gin_file=configs/experiments/tiny_sft.gin
#   tpu/run.sh rlaif ppo --gin_file=configs/experiments/tiny_ppo.gin
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
if [[ $# -eq 0 ]]; then
  echo "usage: tpu/run.sh COMMAND [ARGS...]" >&2
  exit 2
fi
printf -v cmd '%q ' "$@"
on_all_workers "cd $REMOTE_DIR && . .venv/bin/activate && RLAIF_DISTRIBUTED=1 nohup $cmd > $LOG_FILE 2>&1 &"
