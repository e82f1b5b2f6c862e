#!/usr/bin/env bash
# Distributed testing: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]
exec "$(dirname "$0")/torchrun_tool.sh" test.py "$3" "$1" "$2" "${@:4}"
