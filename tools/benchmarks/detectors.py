"""``benchmark.py detectors``: a training iteration (forward, backward, SGD step) of
each RetinaNet variant of the toy config (ResNet-18, random images), timed
round-robin in one process so that every variant sees the same machine state, each
variant's peak memory in a process of its own (``detectors --memory-of VARIANT``),
and ratios to the stock detector (and, for whole-subnet experts, to running k subnets
densely); then, per variant, parameters total and active per gate row and FLOPs per
image at k and at N experts (counted as mmengine's ``get_model_complexity_info``
counts, see ``mmdet_moe.layers.count_active_compute``; ``--compute-only``: this table
alone, no timing)."""
import argparse
import os.path as osp
import statistics
import time
from typing import Dict, List

import torch
import torch.nn as nn

from mmdet_moe.analysis.report import active_compute_table, markdown_table
from mmdet_moe.layers import count_active_compute
from .memory import child_peak_rss_mib, own_peak_rss_mib

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(ROOT, 'configs', 'toy', 'retinanet_r18_fpn_4e_toy-coco.py')
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


def build_detector(variant: str) -> nn.Module:
    """The benchmarked detector (``BENCH_MODEL``) with ``variant``'s changes,
    initialised, in training mode."""
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


def bench_detectors(args: argparse.Namespace) -> None:
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


def add_commands(sub) -> None:
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
