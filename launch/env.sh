#!/usr/bin/env bash
# Environment shared by every launcher (sourced). Each knob keeps a value the caller exported.
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME pin the network interface on multi-homed nodes.
: "${NCCL_DEBUG:=WARN}"
: "${NCCL_IB_DISABLE:=0}"
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${OMP_NUM_THREADS:=1}"
: "${PYTHON:=python}"
export NCCL_DEBUG NCCL_IB_DISABLE TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS
[[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && export NCCL_SOCKET_IFNAME
[[ -n "${GLOO_SOCKET_IFNAME:-}" ]] && export GLOO_SOCKET_IFNAME
# No GPU: DeepSpeed's CPU accelerator and gloo.
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi

# Variables the launchers forward to every node (DeepSpeed's .deepspeed_env format: NAME=value).
ENV_FORWARD=(NCCL_DEBUG NCCL_IB_DISABLE TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS NCCL_SOCKET_IFNAME
             GLOO_SOCKET_IFNAME DS_ACCELERATOR)

forwarded_env() {
  local name
  for name in "${ENV_FORWARD[@]}"; do
    [[ -n "${!name:-}" ]] && printf '%s=%s\n' "$name" "${!name}"
  done
  return 0
}

# DRY_RUN=1: print the resolved environment and command, then exit 0 without launching.
run_or_print() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# environment"
    forwarded_env
    echo "# command"
    printf '%q ' "$@"
    echo
    exit 0
  fi
  exec "$@"
}
