"""Benchmarks (scripts, not tests): forward+backward time of MoE layers and detectors.

    python tools/benchmark.py layers [--batch 8 --size 64 --channels 256 --repeats 5]
                                     [--device cpu|cuda]
    python tools/benchmark.py sweep [--experts 4 8 16 32 64 --mu-experts 64 256 1024
                                     --size 32] [--device cuda]
    python tools/benchmark.py detectors [--batch 4 --size 256 --repeats 10]
                                        [--compute-only]
    python tools/benchmark.py iteration CONFIG [--iters 30] [--cfg-options ...]
    python tools/benchmark.py hooks CONFIG [--checkpoint CKPT --iters 30 --test-images 100]
    python tools/benchmark.py export CONFIG [--checkpoint CKPT --dense-config CONFIG
                                            --shape H W --batch 1 --repeats 20]

This file is the command line; each subject is a module of ``tools/benchmarks/``
whose docstring says what it measures: ``layers`` (MoE conv layers against a dense
conv), ``sweep`` (the cost against the number of experts), ``detectors`` (RetinaNet
variants against the stock one), ``training`` (``iteration``: where a training
iteration's time goes; ``hooks``: the statistics hooks' overhead) and ``export``
(eager PyTorch against onnxruntime).
"""
import argparse
from typing import List, Optional

import torch

from benchmarks import (  # tools/ is this script's sys.path[0]
    detectors, export, layers, sweep, training)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark MoE layers and detectors')
    sub = parser.add_subparsers(dest='command', required=True)
    for subject in (layers, sweep, detectors, training, export):
        subject.add_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, 'check'):  # a check of the subcommand's arguments (benchmarks.cli)
        try:
            args.check(args)
        except ValueError as err:
            parser.error(str(err))
    return args


if __name__ == '__main__':
    torch.manual_seed(0)
    args = parse_args()
    args.func(args)
