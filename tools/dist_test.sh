#!/usr/bin/env bash
# Distributed testing: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]
# (the project's Python and env vars: see torchrun_tool.sh)
if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py args]" >&2
  exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun_tool.sh" test.py "$3" "$1" "$2" "${@:4}"
