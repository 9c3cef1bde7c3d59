#!/usr/bin/env bash
# mpirun: ranks come from mpi4py inside moga_dist.train, rendezvous on MASTER_ADDR:MASTER_PORT.
#   NP=16 HOSTS=node0:8,node1:8 MASTER_ADDR=node0 launch/mpirun.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/tiny_cpu.toml}
NP=${NP:-2}
HOSTS=${HOSTS:-}                        # MPICH: -hosts a:8,b:8 ; for Open MPI put -H into MPI_ARGS
MPIRUN=${MPIRUN:-mpirun}
MPI_ARGS=${MPI_ARGS:-}                  # e.g. "--allow-run-as-root --oversubscribe" for Open MPI
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "$0")/env.sh"
export MASTER_ADDR MASTER_PORT
ENV_FORWARD+=(MASTER_ADDR MASTER_PORT)

cmd=("$MPIRUN" -np "$NP")
[[ -n "$HOSTS" ]] && cmd+=(-hosts "$HOSTS")
if [[ -n "$MPI_ARGS" ]]; then read -r -a extra <<< "$MPI_ARGS"; cmd+=("${extra[@]}"); fi
cmd+=("$PYTHON" -m moga_dist.train --config "$CONFIG" "$@")
run_or_print "${cmd[@]}"
