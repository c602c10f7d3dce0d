#!/usr/bin/env bash
# Runs vit_jax on a Cloud TPU pod slice: one process per TPU VM host, all running the
# same command; jax.distributed finds the other hosts by itself.
#
#   launch/tpu_pod.sh create              # create the TPU VM slice
#   launch/tpu_pod.sh copy                # copy this repository (git HEAD) to every host
#   launch/tpu_pod.sh setup               # pip install it (with jax[tpu]) on every host
#   launch/tpu_pod.sh run -- --config=configs/digits_vit.py --workdir=gs://BUCKET/run1 \
#       [--config.a.b=v ...]              # train on all hosts
#   launch/tpu_pod.sh ssh -- 'COMMAND'    # any command on all hosts
#   launch/tpu_pod.sh delete              # delete the slice
#
# Settings (environment): TPU_NAME (required), ZONE (required), ACCELERATOR
# (default v4-32), TPU_VERSION (default tpu-ubuntu2204-base), PROJECT (default: the
# gcloud default), REMOTE_DIR (default vit_jax, under each host's home directory).
#
# The workdir and the TFDS data_dir must be visible to every host: use gs:// paths.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

if (( $# < 1 )); then
  usage >&2
  exit 2
fi
command="$1"
shift
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if [[ "$command" == "-h" || "$command" == "help" ]]; then
  usage
  exit 0
fi

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM slice}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
accelerator="${ACCELERATOR:-v4-32}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
remote_dir="${REMOTE_DIR:-vit_jax}"
gcloud_args=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all \
    --command="$1"
}

case "$command" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}" \
      --accelerator-type="$accelerator" --version="$version"
    ;;
  copy)
    archive="$(mktemp "${TMPDIR:-/tmp}/vit_jax.XXXXXX.tar.gz")"
    git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:vit_jax.tar.gz" \
      "${gcloud_args[@]}" --worker=all
    rm -f "$archive"
    on_all_hosts "rm -rf $(printf '%q' "$remote_dir") && mkdir -p $(printf '%q' "$remote_dir") && tar -xzf vit_jax.tar.gz -C $(printf '%q' "$remote_dir")"
    ;;
  setup)
    on_all_hosts "cd $(printf '%q' "$remote_dir") && python3 -m pip install -U pip && python3 -m pip install -e . 'jax[tpu]'"
    ;;
  run)
    if (( $# == 0 )); then
      echo "launch/tpu_pod.sh run: give the vit_jax.main arguments after --" >&2
      exit 2
    fi
    args="$(printf '%q ' "$@")"
    on_all_hosts "cd $(printf '%q' "$remote_dir") && python3 -m vit_jax.main ${args% }"
    ;;
  ssh)
    on_all_hosts "$*"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_args[@]}" --quiet
    ;;
  *)
    echo "launch/tpu_pod.sh: unknown command '$command'" >&2
    usage >&2
    exit 2
    ;;
esac
