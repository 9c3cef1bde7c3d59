#!/usr/bin/env bash
# torchrun on one or many nodes (c10d rendezvous): run this on every node, NODE_RANK=0..NNODES-1.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=configs/llama_125m.toml launch/torchrun.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/tiny_cpu.toml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-moga}
RDZV_IS_HOST=${RDZV_IS_HOST:-}          # set 1 on the node that hosts the store when it cannot tell
source "$(dirname "$0")/env.sh"

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
     --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
     --rdzv_id "$RDZV_ID")
[[ -n "$RDZV_IS_HOST" ]] && cmd+=(--rdzv_conf "is_host=$RDZV_IS_HOST")
cmd+=(-m moga_dist.train --config "$CONFIG" "$@")
run_or_print "${cmd[@]}"
