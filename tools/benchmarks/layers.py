"""``benchmark.py layers``: median forward + backward time of the MoE conv layers
(``MoEConv2d`` in each implementation, routed per image and per location, the CP μMoE
conv with its rank matched to a dense conv's parameters) and their ratios to a plain
dense conv."""
import argparse
from typing import List, Tuple

import torch
import torch.nn as nn

from mmdet_moe.layers import CPMuMoEConv2d, MoEConv2d, rank_for_params
from .cli import add_device_argument
from .timing import time_fwd_bwd


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_table(rows: List[Tuple[str, int, float]], reference_time: float) -> None:
    print(f'| {"layer":44s} | {"params":>9s} | {"median ms":>9s} | {"× dense":>7s} |')
    print(f'|{"-" * 46}|{"-" * 11}|{"-" * 11}|{"-" * 9}|')
    for name, params, seconds in rows:
        print(f'| {name:44s} | {params:9,d} | {seconds * 1e3:9.1f} | '
              f'{seconds / reference_time:7.2f} |')


def bench_layers(args: argparse.Namespace) -> None:
    c, n, k = args.channels, args.num_experts, args.top_k

    def make_input():
        return torch.randn(args.batch, c, args.size, args.size)

    layers = [('Conv2d 3×3 (dense reference)', nn.Conv2d(c, c, 3, padding=1))]
    for impl in ['fused', 'dispatch', 'dense']:
        layers.append((f'MoEConv2d N={n} k={k} impl={impl}',
                       MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=k, impl=impl)))
    for impl in ['dispatch', 'dense']:
        layers.append((f'MoEConv2d N={n} k={k} per location, impl={impl}',
                       MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=k, impl=impl,
                                 gate_cfg=dict(gate_mode='pixel'))))
    rank = rank_for_params(c, c, args.mu_experts, kernel_size=3)
    for mode in ['image', 'pixel']:
        layers.append((f'CPMuMoEConv2d N={args.mu_experts} R={rank} gate={mode}',
                       CPMuMoEConv2d(c, c, 3, padding=1, num_experts=args.mu_experts,
                                     rank=rank, gate_mode=mode)))
    print(f'forward+backward on {args.device}, B={args.batch}, {c}→{c} channels, '
          f'{args.size}×{args.size}, {torch.get_num_threads()} threads, median of '
          f'{args.repeats}')
    modules = {name: layer.train() for name, layer in layers}
    seconds = time_fwd_bwd(modules, make_input, args.repeats, device=args.device)
    rows = [(name, num_params(layer), seconds[name]) for name, layer in modules.items()]
    print_table(rows, rows[0][2])


def add_commands(sub) -> None:
    layers = sub.add_parser('layers', help='MoE conv layers against a dense conv')
    layers.add_argument('--batch', type=int, default=8)
    layers.add_argument('--size', type=int, default=64, help='feature map height/width')
    layers.add_argument('--channels', type=int, default=256)
    layers.add_argument('--num-experts', type=int, default=8)
    layers.add_argument('--top-k', type=int, default=2)
    layers.add_argument('--mu-experts', type=int, default=256,
                        help='experts of the CP μMoE conv (parameters matched to dense)')
    layers.add_argument('--repeats', type=int, default=5)
    add_device_argument(layers)
    layers.set_defaults(func=bench_layers)
