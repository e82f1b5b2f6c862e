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

``layers`` prints median times and ratios to a plain dense conv; ``sweep`` the cost
against the number of experts at fixed k of ``MoEConv2d`` (fused, dispatch, dispatch
with a capacity), of whole-subnet experts and of the CP μMoE conv, with the ratio of
the largest N to the smallest and each variant's peak memory. ``detectors`` times
a training iteration (forward, backward, SGD step) of each RetinaNet variant of the
toy config (ResNet-18, random images), round-robin in one process so that every
variant sees the same machine state, measures each variant's peak memory in a
process of its own, and prints ratios to the stock detector (and, for whole-subnet
experts, to running k subnets densely); then, per variant, parameters total and active
per gate row and FLOPs per image at k and at N experts (counted as mmengine's
``get_model_complexity_info`` counts, see ``mmdet_moe.layers.count_active_compute``;
``--compute-only``: this table alone, no timing). ``iteration`` profiles training iterations of
a config on its own data, through mmengine's Runner as ``tools/train.py`` runs them,
and splits their wall time into data loading, data preprocessor, forward (model and
losses), backward, optimizer step and each hook. ``hooks`` measures the overhead of
ExpertUtilisationHook on training iterations and of ExpertSizeStatsHook on a test
run of a config (its own data), as the time inside the hook relative to the rest.
``export`` times a config's tensor forward in eager PyTorch and as the ONNX graph of
``tools/export_onnx.py`` in onnxruntime (the 'export' extra), round-robin, and, when
its MoE layers are all single convs, the same for the stock dense detector that
``tools/merge_experts.py`` would write, or for ``--dense-config`` (random weights
unless ``--checkpoint``).
"""
import argparse
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, Hashable, List

import torch
import torch.nn as nn
from mmengine.config import DictAction
from mmengine.hooks import Hook

from mmdet_moe.analysis.report import active_compute_table, markdown_table
from mmdet_moe.layers import (MoE, CPMuMoEConv2d, MoEConv2d, count_active_compute,
                              rank_for_params)
from mmdet_moe.layers._checks import check_capacity_factor


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


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()
    module.zero_grad(set_to_none=True)


def time_fwd_bwd(modules: Dict[Hashable, nn.Module], make_input, repeats: int,
                 warmup: int = 2, device: torch.device = torch.device('cpu')
                 ) -> Dict[Hashable, float]:
    """Median seconds of forward + backward (sum of outputs) of each module over
    ``repeats`` rounds; the modules run round-robin within a round, so that every
    one sees the same machine state (timings of a shared machine drift)."""
    watch, times = Stopwatch(device), {name: [] for name in modules}
    for module in modules.values():
        module.to(device)
    for i in range(warmup + repeats):
        for name, module in modules.items():
            x = make_input().to(device)
            watch.start()
            fwd_bwd(module, x)
            if i >= warmup:
                times[name].append(watch.stop())
            else:
                watch.stop()
    return {name: statistics.median(t) for name, t in times.items()}


def cuda_peak_mib(module: nn.Module, make_input, device: torch.device) -> float:
    """CUDA allocator peak of one forward + backward of ``module`` alone on the device
    (its parameters, gradients, activations and input); it goes back to the CPU after."""
    module.to(device)
    x = make_input().to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd(module, x)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    module.cpu()
    return peak


def sweep_tables(args):
    """The sweep's tables: title → (reference module factory, numbers of experts,
    {row: factory(N)}). Ratios in a table are to its reference, run densely."""
    c, k = args.channels, args.top_k

    def conv():
        return nn.Conv2d(c, c, 3, padding=1)

    def tower():  # a whole-subnet expert: two conv3×3 + ReLU
        return nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU())

    def moe_conv(impl, capacity=None):
        return lambda n: MoEConv2d(c, c, 3, padding=1, num_experts=n, top_k=k, impl=impl,
                                   capacity_factor=capacity)

    def subnets(capacity=None):
        return lambda n: MoE(expert_factory=tower, num_experts=n, top_k=k, in_channels=c,
                             impl='dispatch', capacity_factor=capacity)

    def mumoe(mode):
        return lambda n: CPMuMoEConv2d(c, c, 3, padding=1, num_experts=n, gate_mode=mode)

    factor = args.capacity_factor
    capacity = f'dispatch, capacity {factor:g}'
    return {
        'MoEConv2d (× dense conv)': (conv, args.experts, {
            'fused': moe_conv('fused'), 'dispatch': moe_conv('dispatch'),
            capacity: moe_conv('dispatch', factor)}),
        'subnet experts, 2 × conv3×3+ReLU (× one subnet)': (tower, args.experts, {
            'dispatch': subnets(), capacity: subnets(factor)}),
        'CP μMoE conv, rank matched to dense (× dense conv)': (conv, args.mu_experts, {
            'gate=image': mumoe('image'), 'gate=pixel': mumoe('pixel')}),
    }


def sweep_module(args, table: int, row: int, n: int) -> nn.Module:
    """Variant ``row`` (-1: the table's reference) of table ``table`` at N = ``n``."""
    reference, _, rows = list(sweep_tables(args).values())[table]
    return (reference() if row < 0 else list(rows.values())[row](n)).train()


def sweep_rss_mib(args, table: int, row: int, n: int) -> float:
    """Peak RSS of a fresh process running forward + backward of one variant."""
    return child_peak_rss_mib(
        ['sweep', '--memory-of', str(table), str(row), str(n), '--batch', str(args.batch),
         '--size', str(args.size), '--channels', str(args.channels), '--top-k',
         str(args.top_k), '--experts', *map(str, args.experts), '--mu-experts',
         *map(str, args.mu_experts), '--capacity-factor', str(args.capacity_factor)])


def bench_sweep(args):
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
    modules = {name: layer.train() for name, layer in layers}
    seconds = time_fwd_bwd(modules, make_input, args.repeats, device=args.device)
    rows = [(name, num_params(layer), seconds[name]) for name, layer in modules.items()]
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


def child_peak_rss_mib(argv: List[str]) -> float:
    """Run this script with ``argv`` in a fresh process; the peak RSS it prints last."""
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)} failed:\n{out.stderr[-2000:]}')
    return float(out.stdout.strip().splitlines()[-1])


def peak_memory_mib(variant: str, batch: int, size: int) -> float:
    """Peak RSS of a fresh process running 3 iterations of ``variant``."""
    return child_peak_rss_mib(['detectors', '--memory-of', variant, '--batch', str(batch),
                               '--size', str(size)])


def detector_compute(steps: Dict[str, DetectorStep]) -> List[dict]:
    """Per variant: the whole-model row of :func:`count_active_compute` (parameters
    total and active per gate row, FLOPs per image at k and at N) on its first image."""
    rows = []
    for variant, step in steps.items():
        model = count_active_compute(step.model, step.data['inputs'][:1]).rows()[-1]
        rows.append(dict(variant=variant, **{key: value for key, value in model.items()
                                             if key.startswith(('params', 'flops'))}))
    return rows


def print_detector_compute(steps: Dict[str, DetectorStep], size: int) -> None:
    rows = detector_compute(steps)
    stock = rows[0]['flops_k']
    for row in rows:
        row['× stock at k'] = f'{row["flops_k"] / stock:.2f}'
    print(f'\nparameters and FLOPs per {size}×{size} image (one multiply-add = one flop, '
          "as mmengine's get_model_complexity_info; at k: as each variant runs, at N: "
          'every expert on every row):')
    print(markdown_table(*active_compute_table(rows)))


def bench_detectors(args):
    if args.memory_of:  # child process: peak memory of one variant
        step = DetectorStep(args.memory_of, args.batch, args.size)
        for _ in range(3):
            step()
        print(own_peak_rss_mib())
        return
    if args.compute_only:
        print_detector_compute({variant: DetectorStep(variant, 1, args.size)
                                for variant in DETECTOR_VARIANTS}, args.size)
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
    print_detector_compute(steps, args.size)


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


def training_config(args, iters: int):
    """The config of ``args.config`` (with ``--cfg-options``) for ``iters`` training
    iterations on its own data, without validation or checkpoints."""
    from mmengine.config import Config
    import mmdet_moe  # noqa: F401
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.train_dataloader.dataset.indices = iters * cfg.train_dataloader.batch_size
    cfg.train_cfg.update(max_epochs=1, val_interval=10 ** 6)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # training only
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.work_dir = args.work_dir
    return cfg


def profile_iteration(args):
    """Profile training iterations of a config through the stock Runner."""
    from mmengine.runner import Runner
    # one more: an iteration is timed when the next one starts
    cfg = training_config(args, args.iters + args.warmup + 1)
    runner = Runner.from_cfg(cfg)
    timer = PhaseTimer(skip=args.warmup)
    runner.register_hook(timer, priority='LOWEST')
    runner.train()
    print(f'{args.config}: {args.iters} training iterations after {args.warmup} '
          f'warm-up, batch {cfg.train_dataloader.batch_size}, {torch.get_num_threads()} '
          'threads')
    print(timer.table())


class HookCost(Hook):
    """Seconds spent in the ``mode`` methods of the hooks of one class, and the wall
    time of the ``mode`` loop (``runner.train_loop.run`` / ``test_loop.run``)."""

    def __init__(self, mode: str, hook_type: str):
        self.mode, self.hook_type = mode, hook_type
        self.hook_seconds = self.loop_seconds = 0.0

    def _timed(self, fn, add):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(time.perf_counter() - start)
        return wrapper

    def _add_hook(self, seconds):
        self.hook_seconds += seconds

    def _add_loop(self, seconds):
        self.loop_seconds += seconds

    def before_run(self, runner) -> None:
        loop = getattr(runner, f'{self.mode}_loop')  # built before before_run
        loop.run = self._timed(loop.run, self._add_loop)
        hooks = [h for h in runner.hooks if type(h).__name__ == self.hook_type]
        if not hooks:
            raise ValueError(f'the config has no {self.hook_type} in custom_hooks')
        for hook in hooks:
            for stage in Hook.stages:
                if self.mode in stage:
                    setattr(hook, stage, self._timed(getattr(hook, stage), self._add_hook))

    def line(self) -> str:
        rest = self.loop_seconds - self.hook_seconds
        return (f'| {self.hook_type:22s} | {self.mode:5s} | {self.loop_seconds:8.2f} | '
                f'{self.hook_seconds * 1e3:9.1f} | {self.hook_seconds / rest:8.2%} |')


def bench_hooks(args):
    """Overhead of the statistics hooks: ExpertUtilisationHook in training,
    ExpertSizeStatsHook in a test run, as the time inside their methods relative to
    the rest of the loop (what a run without the hook takes)."""
    from mmengine.runner import Runner
    train = HookCost('train', 'ExpertUtilisationHook')
    runner = Runner.from_cfg(training_config(args, args.iters))
    runner.register_hook(train, priority='LOWEST')
    runner.train()
    cfg = training_config(args, 1)
    cfg.test_dataloader.dataset.indices = args.test_images
    cfg.load_from = args.checkpoint
    cfg.work_dir = osp.join(args.work_dir, 'test')
    test = HookCost('test', 'ExpertSizeStatsHook')
    runner = Runner.from_cfg(cfg)
    runner.register_hook(test, priority='LOWEST')
    runner.test()
    print(f'{args.config}: {args.iters} training iterations, a test run over '
          f'{args.test_images} images ('
          + (f'weights of {args.checkpoint}' if args.checkpoint else 'random weights')
          + f'), {torch.get_num_threads()} threads; overhead = time in the hook / the '
          'rest of the loop')
    print(f'| {"hook":22s} | {"loop":5s} | {"loop s":>8s} | {"hook ms":>9s} | '
          f'{"overhead":>8s} |')
    print(f'|{"-" * 24}|{"-" * 7}|{"-" * 10}|{"-" * 11}|{"-" * 10}|')
    print(train.line())
    print(test.line())


def bench_export(args):
    """Eager PyTorch against onnxruntime on one config's tensor forward (and on its
    merged dense detector where one exists), round-robin, median ms per call."""
    import tempfile
    import onnxruntime
    from mmdet_moe.engine.evaluation import build_model, load_checked, load_config
    from mmdet_moe.layers import export_onnx
    from mmdet_moe.models.export import TensorForward, example_inputs, input_shape
    from mmdet_moe.models.stock_config import stock_config
    cfg = load_config(args.config, args.cfg_options)
    models = {'MoE': load_checked(cfg, args.checkpoint) if args.checkpoint
              else build_model(cfg)}
    if args.dense_config:
        models['dense (--dense-config)'] = build_model(load_config(args.dense_config))
    else:
        try:
            models['dense (merged)'] = build_model(stock_config(cfg))
        except ValueError as err:
            print(f'no merged dense counterpart ({err}); give --dense-config')
    height, width = input_shape(cfg, args.shape)
    calls, folder = {}, tempfile.mkdtemp(prefix='benchmark_export-')
    for name, model in models.items():
        forward = TensorForward(model).eval()
        inputs = example_inputs(forward, args.batch, height, width, args.num_rois, seed=0)
        names = forward.name_outputs(*inputs)
        path = osp.join(folder, f'{len(calls)}.onnx')
        export_onnx(forward, inputs, path, input_names=forward.input_names,
                    output_names=names, dynamic_rows=forward.dynamic_rows)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options,
                                               providers=['CPUExecutionProvider'])
        feed = {n: t.numpy() for n, t in zip(forward.input_names, inputs, strict=True)}
        calls[f'{name}, eager PyTorch'] = lambda f=forward, x=inputs: f(*x)
        calls[f'{name}, onnxruntime'] = lambda s=session, d=feed: s.run(None, d)
    times = {name: [] for name in calls}
    with torch.no_grad():
        for step in range(args.warmup + args.repeats):
            for name, call in calls.items():  # round-robin: every variant, every step
                start = time.perf_counter()
                call()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times['MoE, eager PyTorch'])
    print(f'{args.config}: tensor forward of {args.batch}×3×{height}×{width} images, '
          f'{torch.get_num_threads()} threads, median of {args.repeats} (CPU)')
    print(markdown_table(['variant', 'ms / call', '× MoE eager'],
                         [[name, statistics.median(t) * 1e3,
                           statistics.median(t) / reference] for name, t in times.items()],
                         digits=2))


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
    sweep.add_argument('--experts', type=int, nargs='+', default=[4, 8, 16, 32, 64],
                       help='numbers of experts of MoEConv2d and the subnet experts')
    sweep.add_argument('--mu-experts', type=int, nargs='+', default=[64, 256, 1024],
                       help='numbers of experts of the CP μMoE conv')
    sweep.add_argument('--capacity-factor', type=float, default=1.25,
                       help='of the capacity-dispatch rows: ceil(f · B · k / N) rows per expert')
    sweep.add_argument('--repeats', type=int, default=5)
    sweep.add_argument('--no-memory', dest='memory', action='store_false',
                       help='skip peak memory (on a CPU: a process per variant, slow)')
    sweep.add_argument('--memory-of', type=int, nargs=3, help=argparse.SUPPRESS)
    add_device_argument(sweep)
    sweep.set_defaults(func=bench_sweep)
    detectors = sub.add_parser('detectors', help='MoE RetinaNet variants against stock')
    detectors.add_argument('--batch', type=int, default=4)
    detectors.add_argument('--size', type=int, default=256, help='image height/width')
    detectors.add_argument('--repeats', type=int, default=10)
    detectors.add_argument('--warmup', type=int, default=2)
    detectors.add_argument('--compute-only', action='store_true',
                           help='print only the parameter and FLOP table (no timing)')
    detectors.add_argument('--memory-of', choices=sorted(DETECTOR_VARIANTS),
                           help=argparse.SUPPRESS)  # internal: one variant per process
    detectors.set_defaults(func=bench_detectors)
    iteration = config_command(sub, 'iteration', 'where the time of a training '
                               'iteration of a config goes (stock Runner, the config\'s data)')
    iteration.add_argument('--iters', type=int, default=30, help='timed iterations')
    iteration.add_argument('--warmup', type=int, default=3)
    iteration.add_argument('--work-dir', default=osp.join('work_dirs', 'benchmark_iteration'))
    iteration.set_defaults(func=profile_iteration)
    hooks = config_command(sub, 'hooks', 'overhead of ExpertUtilisationHook in training '
                           'and ExpertSizeStatsHook in a test run of a config')
    hooks.add_argument('--checkpoint', help='weights for the test run (default: random)')
    hooks.add_argument('--iters', type=int, default=30, help='training iterations')
    hooks.add_argument('--test-images', type=int, default=100)
    hooks.add_argument('--work-dir', default=osp.join('work_dirs', 'benchmark_hooks'))
    hooks.set_defaults(func=bench_hooks)
    export = config_command(sub, 'export', "a config's tensor forward: eager PyTorch "
                            'against its ONNX graph in onnxruntime')
    export.add_argument('--checkpoint', help='weights (default: random)')
    export.add_argument('--dense-config', help='the dense detector to compare with '
                        '(default: the merged one, where the MoE layers are single convs)')
    export.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the test pipeline's)")
    export.add_argument('--batch', type=int, default=1)
    export.add_argument('--num-rois', type=int, default=100,
                        help='RoIs of a two-stage detector')
    export.add_argument('--repeats', type=int, default=20)
    export.add_argument('--warmup', type=int, default=3)
    export.set_defaults(func=bench_export)
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
    if getattr(args, 'capacity_factor', None) is not None:
        try:
            check_capacity_factor(args.capacity_factor)
        except ValueError as err:
            parser.error(f'--capacity-factor: {err}')
    if args.command == 'sweep' and (len(args.mu_experts) < 2 or min(args.mu_experts) < 2):
        parser.error(f'--mu-experts {args.mu_experts}: at least two numbers of experts, '
                     'each >= 2')
    return args


def config_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on a config: CONFIG and ``--cfg-options`` as in tools/train.py."""
    command = sub.add_parser(name, help=help)
    command.add_argument('config')
    command.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    return command


def add_device_argument(parser) -> None:
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cuda: timed with CUDA events after a synchronisation')


if __name__ == '__main__':
    torch.manual_seed(0)
    args = parse_args()
    args.func(args)
