"""Arguments that several subcommands share, and their checks.

A subcommand's parser sets ``func`` (what runs it) and may set ``check``: a function
of the parsed arguments that raises ValueError on a bad combination, which
``tools/benchmark.py`` turns into a usage error (exit code 2)."""
import argparse

import torch
from mmengine.config import DictAction


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cuda: timed with CUDA events after a synchronisation')
    parser.set_defaults(check=check_device)


def check_device(args: argparse.Namespace) -> None:
    """Turn ``args.device`` into a ``torch.device``; a GPU must be there."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA GPU is available to this torch '
                         f'({torch.__version__}); use --device cpu')
    args.device = torch.device(args.device)


def config_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on a config: CONFIG and ``--cfg-options`` as in tools/train.py."""
    command = sub.add_parser(name, help=help)
    command.add_argument('config')
    command.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    return command
