#!/usr/bin/env bash
# The deepspeed launcher: LAUNCHER=local (this node only), pdsh (ssh to each host of HOSTFILE),
# openmpi or mpich. The hostfile lists "hostname slots=N" (see hostfile.example).
#   HOSTFILE=launch/hostfile CONFIG=configs/llama_7b.toml launch/deepspeed.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/tiny_cpu.toml}
LAUNCHER=${LAUNCHER:-local}
HOSTFILE=${HOSTFILE:-launch/hostfile}
NUM_GPUS=${NUM_GPUS:-2}                 # per node, LAUNCHER=local only (hosts' slots otherwise)
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}        # passed to pdsh/mpirun, e.g. "--allow-run-as-root"
DEEPSPEED=${DEEPSPEED:-deepspeed}
source "$(dirname "$0")/env.sh"

cmd=("$DEEPSPEED" --master_port "$MASTER_PORT")
case "$LAUNCHER" in
  local)
    cmd+=(--num_gpus "$NUM_GPUS") ;;
  pdsh|openmpi|mpich)
    [[ -f "$HOSTFILE" || "${DRY_RUN:-0}" == 1 ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
    cmd+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
    [[ -n "$LAUNCHER_ARGS" ]] && cmd+=(--launcher_args "$LAUNCHER_ARGS")
    # The pdsh launcher ships .deepspeed_env to every node.
    if [[ "${DRY_RUN:-0}" != 1 ]]; then forwarded_env > .deepspeed_env; fi ;;
  *)
    echo "deepspeed.sh: LAUNCHER=$LAUNCHER; allowed: local, pdsh, openmpi, mpich" >&2; exit 2 ;;
esac
[[ -n "$MASTER_ADDR" ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--module moga_dist.train --config "$CONFIG" "$@")
run_or_print "${cmd[@]}"
