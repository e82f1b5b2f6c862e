"""Benchmarks (scripts, not tests): forward+backward time of MoE layers and detectors.

    python tools/benchmark.py layers [--batch 8 --size 64 --channels 256 --repeats 5]
                                     [--device cpu|cuda]
    python tools/benchmark.py sweep [--experts 4 8 16 32 64 --size 32] [--device cuda]
    python tools/benchmark.py detectors [--batch 4 --size 256 --repeats 10]
    python tools/benchmark.py iteration CONFIG [--iters 30] [--cfg-options ...]

``layers`` prints median times and ratios to a plain dense conv; ``sweep`` the cost
of fused and dispatch ``MoEConv2d`` against the number of experts at fixed k, with
the ratio of the largest N to the smallest. ``detectors`` times
a training iteration (forward, backward, SGD step) of each RetinaNet variant of the
toy config (ResNet-18, random images), round-robin in one process so that every
variant sees the same machine state, measures each variant's peak memory in a
process of its own, and prints ratios to the stock detector (and, for whole-subnet
experts, to running k subnets densely). ``iteration`` profiles training iterations of
a config on its own data, through mmengine's Runner as ``tools/train.py`` runs them,
and splits their wall time into data loading, data preprocessor, forward (model and
losses), backward, optimizer step and each hook.
"""
import argparse
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
from mmengine.config import DictAction
from mmengine.hooks import Hook

from mmdet_moe.layers import CPMuMoEConv2d, MoEConv2d, rank_for_params


class Stopwatch:
    """Seconds of the work queued between ``start()`` and ``stop()``: CUDA events
    (the GPU's own clock, read after a synchronisation), else ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    def start(self) -> None:
        if self.cuda:
            self._start, self._end = (torch.cuda.Event(enable_timing=True),
                                      torch.cuda.Event(enable_timing=True))
            self._start.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return time.perf_counter() - self._begin


def time_fwd_bwd(module: nn.Module, make_input, repeats: int, warmup: int = 2,
                 device: torch.device = torch.device('cpu')):
    """Median seconds of forward + backward (sum of outputs) over ``repeats`` runs."""
    module.to(device)
    watch, times = Stopwatch(device), []
    for i in range(warmup + repeats):
        x = make_input().to(device)
        watch.start()
        module(x).sum().backward()
        seconds = watch.stop()
        if i >= warmup:
            times.append(seconds)
        module.zero_grad(set_to_none=True)
    return statistics.median(times)


def peak_memory_note(device: torch.device) -> str:
    if device.type != 'cuda':
        return ''
    return f', peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB'


def bench_sweep(args):
    """Cost against the number of experts N at fixed k: fused and dispatch MoEConv2d
    for N in --experts, as ratios to a dense conv, and N_max / N_min per impl."""
    c, device = args.channels, args.device

    def make_input():
        return torch.randn(args.batch, c, args.size, args.size)

    dense = time_fwd_bwd(nn.Conv2d(c, c, 3, padding=1), make_input, args.repeats,
                         device=device)
    print(f'forward+backward on {device}, B={args.batch}, {c}→{c} channels, '
          f'{args.size}×{args.size}, k={args.top_k}, median of {args.repeats}; '
          f'dense conv {dense * 1e3:.1f} ms')
    print(f'| {"impl":8s} | ' + ' | '.join(f'N={n:<4d}' for n in args.experts) +
          f' | N={args.experts[-1]} / N={args.experts[0]} |')
    print('|' + '---|' * (len(args.experts) + 2))
    for impl in ('fused', 'dispatch'):
        times = []
        for n in args.experts:
            layer = MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=args.top_k,
                              impl=impl).train()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            times.append(time_fwd_bwd(layer, make_input, args.repeats, device=device))
            print(f'  {impl} N={n}: {times[-1] * 1e3:.1f} ms'
                  f'{peak_memory_note(device)}', file=sys.stderr, flush=True)
        print(f'| {impl:8s} | ' + ' | '.join(f'{t / dense:5.2f}×' for t in times) +
              f' | {times[-1] / times[0]:.2f} |')


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
    print(f'forward+backward on {args.device}, B={args.batch}, {c}→{c} channels, '
          f'{args.size}×{args.size}, {torch.get_num_threads()} threads, median of '
          f'{args.repeats}')
    rows = []
    for name, layer in layers:
        layer.train()
        rows.append((name, num_params(layer), time_fwd_bwd(layer, make_input, args.repeats,
                                                           device=args.device)))
        print(f'  {name}: {rows[-1][2] * 1e3:.1f} ms', flush=True)
    print_table(rows, rows[0][2])


ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = osp.join(ROOT, 'configs', 'toy', 'retinanet_r18_fpn_3e_toy-coco.py')
# the detector benchmarked: the toy config's data and anchors, but a full-width
# ResNet-18 and RetinaNet's head of 4 convs per branch (the paper's experts), as the
# README's figures were measured (the toy demo trims both to train fast)
BENCH_MODEL = dict(
    backbone=dict(base_channels=64), neck=dict(in_channels=[64, 128, 256, 512]),
    bbox_head=dict(stacked_convs=4, norm_cfg=None))
SUBNET = dict(type='MoERetinaHead', expert_type='subnet', balance_cfg=dict(importance=0.5))
# name: (model changes, name of the variant it is compared with besides the stock one)
DETECTOR_VARIANTS = {
    'stock RetinaNet': ({}, None),
    'conv4 experts N=4 k=2 (fused)': (dict(bbox_head=dict(
        type='MoERetinaHead', expert_type='conv', moe_branches='both', moe_convs=[3],
        impl='fused', balance_cfg=dict(importance=0.5))), None),
    'MoE FPN N=4 k=2 (fused)': (dict(neck=dict(
        type='MoEFPN', moe_parts=['output', 'extra'], balance_cfg=dict(importance=0.5))),
        None),
    'k=2 cls subnets, dense': (dict(bbox_head=dict(
        SUBNET, moe_branches='cls', num_experts=2, top_k=2, impl='dense')), None),
    'cls subnet experts N=4 k=2': (dict(bbox_head=dict(SUBNET, moe_branches='cls')),
                                   'k=2 cls subnets, dense'),
    'k=2 cls+reg subnets, dense': (dict(bbox_head=dict(
        SUBNET, moe_branches='both', num_experts=2, top_k=2, impl='dense')), None),
    'mixed subnet experts N=4 k=2': (dict(bbox_head=dict(SUBNET, moe_branches='both')),
                                     'k=2 cls+reg subnets, dense'),
    'CP μMoE conv4 N=256': (dict(type='MoEDetector', moe_layers=[dict(
        paths=['bbox_head.cls_convs.3.conv', 'bbox_head.reg_convs.3.conv'],
        type='CPMuMoEConv2d', num_experts=256)]), None),  # rank matched to dense
}


def build_detector(variant: str):
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    import mmdet_moe  # noqa: F401
    init_default_scope('mmdet')
    cfg = Config.fromfile(TOY_CONFIG)
    cfg.merge_from_dict(dict(model=BENCH_MODEL))
    changes = dict(DETECTOR_VARIANTS[variant][0])
    if changes.get('type') == 'MoEDetector':
        model_cfg = dict(type='MoEDetector', detector=cfg.model,
                         moe_layers=changes['moe_layers'])
    else:
        cfg.merge_from_dict(dict(model=dict(changes, type='MoERetinaNet') if changes else {}))
        model_cfg = cfg.model
    model = MODELS.build(model_cfg)
    # init_weights logs every parameter at INFO: keep the benchmark output readable
    MMLogger.get_instance('benchmark', log_level='WARNING')
    model.init_weights()
    return model.train()


class DetectorStep:
    """One training iteration (forward, backward, SGD step) of a variant on fixed data."""

    def __init__(self, variant: str, batch: int, size: int):
        from mmdet.testing import demo_mm_inputs
        self.model = build_detector(variant)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        packed = demo_mm_inputs(batch, [[3, size, size]] * batch, num_items=[4] * batch,
                                num_classes=5)
        self.data = self.model.data_preprocessor(packed, True)

    def __call__(self) -> float:
        start = time.perf_counter()
        loss, _ = self.model.parse_losses(self.model(**self.data, mode='loss'))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def own_peak_rss_mib() -> float:
    """This process's peak resident memory. ``ru_maxrss`` is not used: on Linux it
    keeps the parent's high-water mark across fork + exec."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(variant: str, batch: int, size: int) -> float:
    """Peak RSS of a fresh process running 3 iterations of ``variant``."""
    out = subprocess.run(
        [sys.executable, __file__, 'detectors', '--memory-of', variant, '--batch',
         str(batch), '--size', str(size)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'variant {variant!r} failed:\n{out.stderr[-2000:]}')
    return float(out.stdout.strip().splitlines()[-1])


def bench_detectors(args):
    if args.memory_of:  # child process: peak memory of one variant
        step = DetectorStep(args.memory_of, args.batch, args.size)
        for _ in range(3):
            step()
        print(own_peak_rss_mib())
        return
    print(f'training iteration (forward, backward, SGD step), toy RetinaNet R-18, '
          f'B={args.batch}, {args.size}×{args.size} random images, '
          f'{torch.get_num_threads()} threads; median of {args.repeats} rounds, the '
          f'variants timed round-robin in one process; peak memory: one process each')
    steps = {variant: DetectorStep(variant, args.batch, args.size)
             for variant in DETECTOR_VARIANTS}
    times = {variant: [] for variant in steps}
    for round_ in range(args.warmup + args.repeats):
        for variant, step in steps.items():
            seconds = step()
            if round_ >= args.warmup:
                times[variant].append(seconds)
    median = {v: statistics.median(t) for v, t in times.items()}
    stock = median['stock RetinaNet']
    print(f'| {"variant":32s} | {"median ms":>9s} | {"peak MiB":>8s} | '
          f'{"× stock":>7s} | {"× reference":>20s} |')
    print(f'|{"-" * 34}|{"-" * 11}|{"-" * 10}|{"-" * 9}|{"-" * 22}|')
    for variant, seconds in median.items():
        reference = DETECTOR_VARIANTS[variant][1]
        vs_ref = f'{seconds / median[reference]:.2f} × k dense' if reference else ''
        print(f'| {variant:32s} | {seconds * 1e3:9.0f} | '
              f'{peak_memory_mib(variant, args.batch, args.size):8.0f} | '
              f'{seconds / stock:7.2f} | {vs_ref:>20s} |', flush=True)


class PhaseTimer(Hook):
    """Wall time per phase of the training iterations of a Runner.

    Installed by ``before_train`` (the optimizer wrapper exists by then), it wraps the
    data preprocessor, the model's ``loss``, the optimizer wrapper's ``backward`` and
    ``step`` and every hook's per-iteration methods. What is left of an iteration's
    wall time (from one ``run_iter`` to the next) is data loading. An iteration
    counts once the next one starts, so every counted phase has its wall time.
    """

    def __init__(self, skip: int):
        self.skip, self.iters, self.timed_iters = skip, 0, 0
        self.seconds, self._current, self._iter_start = {}, {}, None

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[phase] = self._current.get(phase, 0.0) + \
                    time.perf_counter() - start
        return wrapper

    def before_train(self, runner) -> None:
        from mmengine.model import is_model_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        preprocessor = model.data_preprocessor
        preprocessor.forward = self.timed('data preprocessor', preprocessor.forward)
        model.loss = self.timed('forward (model + losses)', model.loss)
        optim = runner.optim_wrapper
        optim.backward = self.timed('backward', optim.backward)
        optim.step = self.timed('optimizer step (grad clip included)', optim.step)
        for hook in runner.hooks:
            if hook is not self:
                for stage in ('before_train_iter', 'after_train_iter'):
                    setattr(hook, stage, self.timed(f'hook {type(hook).__name__}',
                                                    getattr(hook, stage)))
        loop = runner.train_loop
        loop.run_iter = self._iteration(loop.run_iter)

    def _iteration(self, run_iter):
        def wrapper(*args, **kwargs):
            now = time.perf_counter()
            if self._iter_start is not None and self.iters > self.skip:
                self._current['iteration (wall)'] = now - self._iter_start
                for phase, seconds in self._current.items():
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
                self.timed_iters += 1
            self._current, self._iter_start = {}, now
            self.iters += 1
            return run_iter(*args, **kwargs)
        return wrapper

    def table(self) -> str:
        parts = dict(self.seconds)
        wall = parts.pop('iteration (wall)')
        parts['data loading (rest of the iteration)'] = wall - sum(parts.values())
        lines = [f'| {"phase":40s} | {"ms / iter":>9s} | {"share":>6s} |',
                 f'|{"-" * 42}|{"-" * 11}|{"-" * 8}|']
        for phase, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            lines.append(f'| {phase:40s} | {seconds / self.timed_iters * 1e3:9.1f} | '
                         f'{seconds / wall:6.1%} |')
        lines.append(f'| {"iteration (wall)":40s} | '
                     f'{wall / self.timed_iters * 1e3:9.1f} | {1:6.0%} |')
        return '\n'.join(lines)


def profile_iteration(args):
    """Profile training iterations of a config through the stock Runner."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    import mmdet_moe  # noqa: F401
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    batch = cfg.train_dataloader.batch_size
    # one more: an iteration is timed when the next one starts
    cfg.train_dataloader.dataset.indices = (args.iters + args.warmup + 1) * batch
    cfg.train_cfg.update(max_epochs=1, val_interval=10 ** 6)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # training only
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.work_dir = args.work_dir
    runner = Runner.from_cfg(cfg)
    timer = PhaseTimer(skip=args.warmup)
    runner.register_hook(timer, priority='LOWEST')
    runner.train()
    print(f'{args.config}: {args.iters} training iterations after {args.warmup} '
          f'warm-up, batch {batch}, {torch.get_num_threads()} threads')
    print(timer.table())


def parse_args(argv=None):
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
    add_device_argument(layers)
    layers.set_defaults(func=bench_layers)
    sweep = sub.add_parser('sweep', help='MoEConv2d cost against the number of experts')
    sweep.add_argument('--batch', type=int, default=8)
    sweep.add_argument('--size', type=int, default=32, help='feature map height/width')
    sweep.add_argument('--channels', type=int, default=256)
    sweep.add_argument('--top-k', type=int, default=2)
    sweep.add_argument('--experts', type=int, nargs='+', default=[4, 8, 16, 32, 64])
    sweep.add_argument('--repeats', type=int, default=5)
    add_device_argument(sweep)
    sweep.set_defaults(func=bench_sweep)
    detectors = sub.add_parser('detectors', help='MoE RetinaNet variants against stock')
    detectors.add_argument('--batch', type=int, default=4)
    detectors.add_argument('--size', type=int, default=256, help='image height/width')
    detectors.add_argument('--repeats', type=int, default=10)
    detectors.add_argument('--warmup', type=int, default=2)
    detectors.add_argument('--memory-of', choices=sorted(DETECTOR_VARIANTS),
                           help=argparse.SUPPRESS)  # internal: one variant per process
    detectors.set_defaults(func=bench_detectors)
    iteration = sub.add_parser('iteration', help='where the time of a training iteration '
                               'of a config goes (stock Runner, the config\'s data)')
    iteration.add_argument('config')
    iteration.add_argument('--iters', type=int, default=30, help='timed iterations')
    iteration.add_argument('--warmup', type=int, default=3)
    iteration.add_argument('--work-dir', default=osp.join('work_dirs', 'benchmark_iteration'))
    iteration.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    iteration.set_defaults(func=profile_iteration)
    args = parser.parse_args(argv)
    if getattr(args, 'device', None) is not None:
        if args.device == 'cuda' and not torch.cuda.is_available():
            parser.error('--device cuda: no CUDA GPU is available to this torch '
                         f'({torch.__version__}); use --device cpu')
        args.device = torch.device(args.device)
    if getattr(args, 'experts', None) is not None and (
            len(args.experts) < 2 or min(args.experts) < args.top_k):
        parser.error(f'--experts {args.experts}: at least two numbers of experts, each '
                     f'>= --top-k {args.top_k}')
    return args


def add_device_argument(parser) -> None:
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cuda: timed with CUDA events after a synchronisation')


if __name__ == '__main__':
    torch.manual_seed(0)
    args = parse_args()
    args.func(args)
