#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG GPUS [train.py args]
# (the project's Python and env vars: see torchrun_tool.sh)
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG GPUS [train.py args]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun_tool.sh" train.py "$2" "$1" "${@:3}"
