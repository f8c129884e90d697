#!/usr/bin/env bash
# Copy this checkout to every worker and install it (JAX for TPU), as README.md says.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"
repo_root=$(cd "$(dirname "$0")/.." && pwd)

# A tarball of the tracked files: no venvs, runs or caches travel.
tarball=${TMPDIR:-/tmp}/rlaif_jax_src.tar.gz
if [[ "${DRY_RUN:-0}" != "1" ]]; then
  git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
fi
gcloud_tpu scp "$tarball" "$TPU_NAME:rlaif_jax_src.tar.gz" --worker=all
on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf rlaif_jax_src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]' && python -c 'import jax; print(jax.process_index(), jax.device_count())'"
