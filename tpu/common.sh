#!/usr/bin/env bash
# Shared settings for the Cloud TPU scripts. Every value can be set in the environment.
# DRY_RUN=1 prints each gcloud command instead of running it.

TPU_NAME=${TPU_NAME:-rlaif-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
# Where the checkout lives on every worker.
REMOTE_DIR=${REMOTE_DIR:-rlaif_jax}
LOG_FILE=${LOG_FILE:-rlaif_jax.log}

gcloud_tpu() {
  # gcloud compute tpus tpu-vm <args...> with zone and project filled in.
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    cmd+=(--project="$PROJECT")
  fi
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
  else
    "${cmd[@]}"
  fi
}

on_all_workers() {
  # Runs a shell command on every worker of the slice at once.
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}
