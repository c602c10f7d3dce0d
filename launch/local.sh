#!/usr/bin/env bash
# Runs a multi-process vit_jax job on this machine: N copies of `python -m vit_jax.main`
# joined by jax.distributed over 127.0.0.1 (CPU collectives go through gloo). It is how
# the tests check multi-host behaviour, and a way to try a pod's setup on a laptop.
#
#   launch/local.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] \
#       -- --config=configs/digits_vit.py --workdir=workdirs/local2 [--config.a.b=v ...]
#
#   -n  processes to start (default 2)
#   -d  CPU devices per process (default 1; sets --xla_force_host_platform_device_count)
#   -p  coordinator port (default: a free one)
#   -l  directory for the logs of processes 1..N-1 (default: a new temporary one);
#       process 0 writes to this terminal
#
# Environment: PYTHON (default python3). Run from the repository root (or with
# vit_jax installed). If one process fails, the others are stopped and the exit
# status is that of the first failure.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

processes=2
devices=1
port=""
log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then
  shift
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: -n and -d take positive integers" >&2
  exit 2
fi

python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/vit_jax_local.XXXXXX")"
fi
mkdir -p "$log_dir"
if (( devices > 1 )); then
  export XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}"
fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

echo "launch/local.sh: $processes processes x $devices device(s), coordinator" \
  "127.0.0.1:$port, logs of processes 1..$((processes - 1)) in $log_dir" >&2
for ((i = 0; i < processes; i++)); do
  args=(-m vit_jax.main "$@" "--coordinator_address=127.0.0.1:$port"
        "--num_processes=$processes" "--process_id=$i")
  if (( i == 0 )); then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for ((left = processes; left > 0; left--)); do
  code=0
  wait -n || code=$?
  if (( code != 0 && status == 0 )); then
    status=$code
    echo "launch/local.sh: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
if (( status != 0 )); then
  for ((i = 1; i < processes; i++)); do
    echo "--- last lines of process $i ($log_dir/process_$i.log):" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
  done
fi
exit "$status"
