#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG GPUS [train.py args]
exec "$(dirname "$0")/torchrun_tool.sh" train.py "$2" "$1" "${@:3}"
