#!/usr/bin/env bash
# torchrun_tool.sh SCRIPT GPUS [ARGS...]: run tools/SCRIPT in GPUS processes per node
# with --launcher pytorch, through torchrun (`python -m torch.distributed.run`) of the
# project's environment: $PYTHON if set, else the repository's .venv/bin/python if it
# exists, else `python` on PATH. NNODES, NODE_RANK, MASTER_ADDR and PORT set up
# multi-node runs, as in mmdet's dist_train.sh / dist_test.sh. Works from any directory
# (relative paths in ARGS are relative to the current one). Without CUDA, train.py and
# test.py run the processes on CPU over gloo (mmdet_moe/stock_tools.py).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 SCRIPT GPUS [ARGS...]" >&2
  exit 2
fi
TOOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$TOOLS_DIR")
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
SCRIPT=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --nproc_per_node="$GPUS" --master_port="$PORT" \
  "$TOOLS_DIR/$SCRIPT" "${@:3}" --launcher pytorch
