"""Benchmarks (scripts, not tests): forward+backward time of MoE layers and detectors.

    python tools/benchmark.py layers [--batch 8 --size 64 --channels 256 --repeats 5]

Prints a table of median times and ratios to the plain dense layer.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from mmdet_moe.layers import CPMuMoEConv2d, MoEConv2d, rank_for_params


def time_fwd_bwd(module: nn.Module, make_input, repeats: int, warmup: int = 2):
    """Median seconds of forward + backward (sum of outputs) over ``repeats`` runs."""
    times = []
    for i in range(warmup + repeats):
        x = make_input()
        start = time.perf_counter()
        module(x).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return statistics.median(times)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_table(rows, reference_time):
    print(f'| {"layer":44s} | {"params":>9s} | {"median ms":>9s} | {"× dense":>7s} |')
    print(f'|{"-" * 46}|{"-" * 11}|{"-" * 11}|{"-" * 9}|')
    for name, params, seconds in rows:
        print(f'| {name:44s} | {params:9,d} | {seconds * 1e3:9.1f} | '
              f'{seconds / reference_time:7.2f} |')


def bench_layers(args):
    c, n, k = args.channels, args.num_experts, args.top_k

    def make_input():
        return torch.randn(args.batch, c, args.size, args.size)

    layers = [('Conv2d 3×3 (dense reference)', nn.Conv2d(c, c, 3, padding=1))]
    for impl in ['fused', 'dispatch', 'dense']:
        layers.append((f'MoEConv2d N={n} k={k} impl={impl}',
                       MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=k, impl=impl)))
    rank = rank_for_params(c, c, args.mu_experts, kernel_size=3)
    for mode in ['image', 'pixel']:
        layers.append((f'CPMuMoEConv2d N={args.mu_experts} R={rank} gate={mode}',
                       CPMuMoEConv2d(c, c, 3, padding=1, num_experts=args.mu_experts,
                                     rank=rank, gate_mode=mode)))
    print(f'forward+backward, B={args.batch}, {c}→{c} channels, {args.size}×{args.size}, '
          f'{torch.get_num_threads()} threads, median of {args.repeats}')
    rows = []
    for name, layer in layers:
        layer.train()
        rows.append((name, num_params(layer), time_fwd_bwd(layer, make_input, args.repeats)))
        print(f'  {name}: {rows[-1][2] * 1e3:.1f} ms', flush=True)
    print_table(rows, rows[0][2])


def parse_args():
    parser = argparse.ArgumentParser(description='Benchmark MoE layers and detectors')
    sub = parser.add_subparsers(dest='command', required=True)
    layers = sub.add_parser('layers', help='MoE conv layers against a dense conv')
    layers.add_argument('--batch', type=int, default=8)
    layers.add_argument('--size', type=int, default=64, help='feature map height/width')
    layers.add_argument('--channels', type=int, default=256)
    layers.add_argument('--num-experts', type=int, default=8)
    layers.add_argument('--top-k', type=int, default=2)
    layers.add_argument('--mu-experts', type=int, default=256,
                        help='experts of the CP μMoE conv (parameters matched to dense)')
    layers.add_argument('--repeats', type=int, default=5)
    layers.set_defaults(func=bench_layers)
    return parser.parse_args()


if __name__ == '__main__':
    torch.manual_seed(0)
    args = parse_args()
    args.func(args)
