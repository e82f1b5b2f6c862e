#!/usr/bin/env bash
# torchrun_tool.sh SCRIPT GPUS [ARGS...]: run tools/SCRIPT in GPUS processes per node
# with --launcher pytorch. NNODES, NODE_RANK, MASTER_ADDR and PORT set up multi-node
# runs, as in mmdet's dist_train.sh / dist_test.sh.
set -euo pipefail
SCRIPT=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$GPUS" --master_port="$PORT" \
  "$(dirname "$0")/$SCRIPT" "${@:3}" --launcher pytorch
