"""``benchmark.py sweep``: the cost against the number of experts N at fixed k of
``MoEConv2d`` (fused, dispatch, dispatch with a capacity; routed per location: each
location's k experts, or all N), of whole-subnet experts (per image; per location)
and of the CP μMoE conv, with the ratio of the largest N to the smallest and each
variant's peak memory (CUDA allocator peak, or on a CPU the peak RSS of a process
per variant: ``sweep --memory-of TABLE ROW N``)."""
import argparse
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from mmdet_moe.layers import MoE, CPMuMoEConv2d, MoEConv2d
from mmdet_moe.layers._checks import check_capacity_factor
from .cli import add_device_argument, check_device
from .memory import child_peak_rss_mib, cuda_peak_mib, own_peak_rss_mib
from .timing import fwd_bwd, time_fwd_bwd

# title → (reference module factory, numbers of experts, {row: factory(N)})
SweepTables = Dict[str, Tuple[Callable[[], nn.Module], List[int],
                              Dict[str, Callable[[int], nn.Module]]]]


def sweep_tables(args: argparse.Namespace) -> SweepTables:
    """The sweep's tables. Ratios in a table are to its reference, run densely."""
    c, k = args.channels, args.top_k

    def conv():
        return nn.Conv2d(c, c, 3, padding=1)

    def tower():  # a whole-subnet expert: two conv3×3 + ReLU
        return nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU())

    def moe_conv(impl, capacity=None, mode='image'):
        return lambda n: MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=k, impl=impl,
                                   capacity_factor=capacity, gate_cfg=dict(gate_mode=mode))

    def subnets(capacity=None, mode='image'):
        return lambda n: MoE(expert_factory=tower, num_experts=n, top_k=k, in_channels=c,
                             impl='dispatch', capacity_factor=capacity,
                             gate_cfg=dict(gate_mode=mode))

    def mumoe(mode):
        return lambda n: CPMuMoEConv2d(c, c, 3, padding=1, num_experts=n, gate_mode=mode)

    factor = args.capacity_factor
    capacity = f'dispatch, capacity {factor:g}'
    return {
        'MoEConv2d (× dense conv)': (conv, args.experts, {
            'fused': moe_conv('fused'), 'dispatch': moe_conv('dispatch'),
            capacity: moe_conv('dispatch', factor),
            'per location, dispatch': moe_conv('dispatch', mode='pixel'),
            'per location, dense': moe_conv('dense', mode='pixel')}),
        'subnet experts, 2 × conv3×3+ReLU (× one subnet)': (tower, args.experts, {
            'dispatch': subnets(), capacity: subnets(factor),
            'per location (all N, mixed)': subnets(mode='pixel')}),
        'CP μMoE conv, rank matched to dense (× dense conv)': (conv, args.mu_experts, {
            'gate=image': mumoe('image'), 'gate=pixel': mumoe('pixel')}),
    }


def sweep_module(args: argparse.Namespace, table: int, row: int, n: int) -> nn.Module:
    """Variant ``row`` (-1: the table's reference) of table ``table`` at N = ``n``."""
    reference, _, rows = list(sweep_tables(args).values())[table]
    return (reference() if row < 0 else list(rows.values())[row](n)).train()


def sweep_rss_mib(args: argparse.Namespace, table: int, row: int, n: int) -> float:
    """Peak RSS of a fresh process running forward + backward of one variant."""
    return child_peak_rss_mib(
        ['sweep', '--memory-of', str(table), str(row), str(n), '--batch', str(args.batch),
         '--size', str(args.size), '--channels', str(args.channels), '--top-k',
         str(args.top_k), '--experts', *map(str, args.experts), '--mu-experts',
         *map(str, args.mu_experts), '--capacity-factor', str(args.capacity_factor)])


def bench_sweep(args: argparse.Namespace) -> None:
    """Cost against the number of experts N at fixed k: per table, forward + backward
    time as a ratio to the table's dense reference (all variants of a table timed
    round-robin), N_max / N_min per row, and peak memory per variant."""
    device = args.device

    def make_input():
        return torch.randn(args.batch, args.channels, args.size, args.size)

    if args.memory_of:  # child process: peak RSS of one variant
        fwd_bwd(sweep_module(args, *args.memory_of), make_input())
        print(own_peak_rss_mib())
        return
    print(f'forward+backward on {device}, B={args.batch}, {args.channels}→{args.channels} '
          f'channels, {args.size}×{args.size}, k={args.top_k}, '
          f'{torch.get_num_threads()} threads, median of {args.repeats} rounds; peak memory: '
          + ('CUDA allocator peak' if device.type == 'cuda' else
             'peak RSS of a process running the variant alone (torch included)'))
    for table, (title, (_, experts, rows)) in enumerate(sweep_tables(args).items()):
        if TABLE_NAMES[table] not in args.tables:
            continue
        keys = [(-1, experts[0])] + [(row, n) for row in range(len(rows)) for n in experts]
        modules = {key: sweep_module(args, table, *key) for key in keys}
        seconds = time_fwd_bwd(modules, make_input, args.repeats, device=device)
        if not args.memory:
            peak = {}
        elif device.type == 'cuda':
            for module in modules.values():  # each variant measured alone on the GPU
                module.cpu()
            torch.cuda.empty_cache()
            peak = {key: cuda_peak_mib(m, make_input, device) for key, m in modules.items()}
        else:
            peak = {key: sweep_rss_mib(args, table, *key) for key in modules}
        del modules
        reference = seconds[-1, experts[0]]
        print(f'\n{title}: reference {reference * 1e3:.1f} ms'
              + (f', {peak[-1, experts[0]]:.0f} MiB' if peak else ''))
        header = ' | '.join(f'N={n:<5d}' for n in experts)
        print(f'| {"variant":26s} | {header} | N={experts[-1]} / N={experts[0]} |'
              + (f' peak MiB, N={experts[0]} … N={experts[-1]} |' if peak else ''))
        print('|' + '---|' * (len(experts) + 2 + bool(peak)))
        for row, name in enumerate(rows):
            times = [seconds[row, n] for n in experts]
            memory = ' … '.join(f'{peak[row, n]:.0f}' for n in experts) + ' |' if peak else ''
            print(f'| {name:26s} | ' + ' | '.join(f'{t / reference:6.2f}×' for t in times)
                  + f' | {times[-1] / times[0]:.2f} |' + (f' {memory}' if peak else ''),
                  flush=True)


# --tables names, in sweep_tables' order
TABLE_NAMES = ('conv', 'subnet', 'mumoe')


def check_sweep_args(args: argparse.Namespace) -> None:
    """The device, then the numbers of experts and the capacity factor."""
    check_device(args)
    if len(args.experts) < 2 or min(args.experts) < args.top_k:
        raise ValueError(f'--experts {args.experts}: at least two numbers of experts, '
                         f'each >= --top-k {args.top_k}')
    try:
        check_capacity_factor(args.capacity_factor)
    except ValueError as err:
        raise ValueError(f'--capacity-factor: {err}') from err
    if len(args.mu_experts) < 2 or min(args.mu_experts) < 2:
        raise ValueError(f'--mu-experts {args.mu_experts}: at least two numbers of '
                         'experts, each >= 2')


def add_commands(sub) -> None:
    sweep = sub.add_parser('sweep', help='MoEConv2d cost against the number of experts')
    sweep.add_argument('--batch', type=int, default=8)
    sweep.add_argument('--size', type=int, default=32, help='feature map height/width')
    sweep.add_argument('--channels', type=int, default=256)
    sweep.add_argument('--top-k', type=int, default=2)
    sweep.add_argument('--experts', type=int, nargs='+', default=[4, 8, 16, 32, 64],
                       help='numbers of experts of MoEConv2d and the subnet experts')
    sweep.add_argument('--mu-experts', type=int, nargs='+', default=[64, 256, 1024],
                       help='numbers of experts of the CP μMoE conv')
    sweep.add_argument('--capacity-factor', type=float, default=1.25,
                       help='of the capacity-dispatch rows: ceil(f · B · k / N) rows per expert')
    sweep.add_argument('--tables', nargs='+', choices=TABLE_NAMES, default=list(TABLE_NAMES),
                       help='which tables: MoEConv2d, subnet experts, CP μMoE (default all)')
    sweep.add_argument('--repeats', type=int, default=5)
    sweep.add_argument('--no-memory', dest='memory', action='store_false',
                       help='skip peak memory (on a CPU: a process per variant, slow)')
    sweep.add_argument('--memory-of', type=int, nargs=3, help=argparse.SUPPRESS)
    add_device_argument(sweep)
    sweep.set_defaults(func=bench_sweep, check=check_sweep_args)
