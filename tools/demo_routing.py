"""Routing granularity on the toy: the same data, seeds and schedule for detectors whose
experts are chosen per image, per location, per object or in the neck.

    python tools/demo.py --routing      # what `make demo-routing` runs
    python tools/demo_routing.py --seeds 1 --arms image location-conv

1. generates the toy COCO dataset as `make demo` does (tools/demo.py's step);
2. trains and evaluates every arm (ARMS) for each seed as tools/demo.py trains its MoE
   detector (tools/train.py, then tools/analyze_experts.py);
3. prints and writes ``<work-dir>/routing.md``: per arm and MoE layer AP, AP_S/M/L,
   active parameters, seconds per training iteration, NMI(expert; size), NMI(size |
   level) and NMI(relative scale | level), each with its 95 % bootstrap interval and
   its shuffled baseline, as mean ± sd over seeds, and one sentence per row on what it
   shows.
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

from demo import (DEFAULT_DATA, ROOT, TOY, Run, mean_sd, parameter_counts, prepare_dataset,
                  publish, seconds_per_iteration)
from demo_paper import values


class Arm(NamedTuple):
    """One routing granularity: its toy config and what it is."""
    name: str
    config: str
    label: str


def toy(name: str) -> str:
    return osp.join(TOY, name)


ARMS = [
    Arm('image', toy('retinanet_r18_fpn_moe-head_4e_toy-coco.py'),
        'per image and level: subnet experts (the demo)'),
    Arm('location-subnet', toy('retinanet_r18_fpn_moe-head-pixel_4e_toy-coco.py'),
        'per location: subnet experts'),
    Arm('location-conv', toy('retinanet_r18_fpn_moe-conv-pixel_4e_toy-coco.py'),
        'per location: single-conv experts'),
    Arm('mumoe-pixel', toy('retinanet_r18_fpn_mumoe-pixel_4e_toy-coco.py'),
        'per location: CP μMoE, 16 soft experts'),
    Arm('scale-supervised', toy('retinanet_r18_fpn_moe-conv-scale-routed_4e_toy-coco.py'),
        'per location, routing supervised by relative scale (positive control)'),
    Arm('roi', toy('faster-rcnn_r18_fpn_moe-roi-head_4e_toy-coco.py'),
        'per object: Faster R-CNN RoI-head convs'),
    Arm('moe-fpn', toy('retinanet_r18_moe-fpn_4e_toy-coco.py'),
        'per image and level: MoE FPN output convs'),
]
ARM_NAMES = [arm.name for arm in ARMS]
REPORT = 'routing.md'
# (figure in a row's dict, layer_summary's keys of its value, 95 % interval and
# shuffled baseline, header)
NMIS = (('nmi', 'nmi', 'nmi_interval', 'nmi_shuffled', 'NMI(expert; size)'),
        ('nmi_given_level', 'nmi_given_level', 'nmi_given_level_interval',
         'nmi_given_level_shuffled', 'NMI(size | level)'),
        ('nmi_rel_scale', 'nmi_rel_scale_given_level', 'nmi_rel_scale_interval',
         'nmi_rel_scale_shuffled', 'NMI(relative scale | level)'))
AP_FIGURES = ('AP', 'AP_S', 'AP_M', 'AP_L')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Routing granularity on the toy: per image, per location, per object, '
                    'in the neck, trained alike (`make demo-routing`)')
    parser.add_argument('--seeds', type=int, default=1,
                        help='train every arm with seeds 0 … SEEDS-1; mean ± sd')
    parser.add_argument('--arms', nargs='+', choices=ARM_NAMES, default=ARM_NAMES,
                        metavar='ARM', help=f'the arms to run (default all: {ARM_NAMES})')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'toy_coco'))
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo_routing'))
    parser.add_argument('--train-images', type=int, default=DEFAULT_DATA[0])
    parser.add_argument('--val-images', type=int, default=DEFAULT_DATA[1])
    parser.add_argument('--image-size', type=int, default=DEFAULT_DATA[2])
    parser.add_argument('--epochs', type=int, default=None,
                        help="training epochs of every arm (default: the configs' 3)")
    parser.add_argument('--regenerate', action='store_true', help='remake the dataset')
    parser.add_argument('--report-only', action='store_true',
                        help='no training: the table from the runs already in --work-dir')
    parser.add_argument('--tiny', action='store_true',
                        help='test settings: batch 2, no data-loader workers, log every iter')
    parser.set_defaults(per_expert=False)  # tools/demo.py's evaluation, routing as learned
    args = parser.parse_args(argv)
    for name in ('seeds', 'epochs'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name} must be >= 1, got {value}')
    return args


class RoutingRun(Run):
    """One arm trained and evaluated at a seed."""

    def __init__(self, args, arm: Arm, seed: int):
        super().__init__(args, arm.name, arm.config, arm.label, seed)
        self.arm = arm

    def layer_figures(self) -> Dict[str, dict]:
        """Per MoE layer of the arm: AP, AP_S/M/L, the NMIs with interval bounds and
        baselines (None where the layer has none), active parameters, s/iter."""
        from mmdet_moe.analysis import BUCKET_NAMES, layer_summary
        ap = {k: v for k, v in self.metrics()[0].items() if k in AP_FIGURES}
        common = dict(ap, active=parameter_counts(self.config).active,
                      seconds_per_iter=seconds_per_iteration(self.work_dir))
        layers = {}
        for name, layer in self.stats()['layers'].items():
            summary = layer_summary(layer, BUCKET_NAMES)
            figures = dict(common)
            detections = summary['view'] == 'detection'
            for key, value_key, interval_key, baseline_key, _ in NMIS:
                figures[key] = summary.get(value_key) if detections else None
                figures[f'{key}_baseline'] = summary.get(baseline_key) if detections else None
                lower, upper = (summary.get(interval_key) if detections else None) or \
                    (None, None)
                figures.update({f'{key}_lower': lower, f'{key}_upper': upper})
            # in the words of the layer's report (tools/analyze_experts.py)
            figures['verdict'] = summary['verdict']
            figures['rel_scale_verdict'] = summary.get('rel_scale_verdict')
            layers[name] = figures
        return layers


def nmi_cell(rows: Sequence[dict], key: str) -> str:
    """``mean ± sd [interval] (baseline b)`` over seeds; ``–`` where the layer has none."""
    found = values(rows, key)
    if not found:
        return '–'
    text = f'{found[0]:.3f}' if len(found) == 1 else mean_sd(found)
    if values(rows, f'{key}_lower'):
        lower, upper = (statistics.mean(values(rows, f'{key}_{end}'))
                        for end in ('lower', 'upper'))
        text += f' [{lower:.3f}, {upper:.3f}]'
    baseline = values(rows, f'{key}_baseline')
    return text + (f' (baseline {statistics.mean(baseline):.3f})' if baseline else '')


def plain_cell(rows: Sequence[dict], key: str) -> str:
    found = values(rows, key)
    if not found:
        return '–'
    return f'{found[0]:.3f}' if len(found) == 1 else mean_sd(found)


def row_sentence(label: str, layer: str, rows: Sequence[dict]) -> str:
    """What a row shows: the verdicts of the layer's report (on the level-controlled
    size NMI and on relative scale), each seed's where the seeds differ."""
    if all(row.get('nmi') is None for row in rows):
        return (f'{label}, {layer}: no detection reached the score threshold with tags of '
                'this layer; nothing to say about sizes.')
    verdicts = []
    for key in ('verdict', 'rel_scale_verdict'):
        said = list(dict.fromkeys(row[key] for row in rows if row.get(key)))
        verdicts.append(said[0] if len(said) == 1 else
                        ' / '.join(f'seed {i}: {v}' for i, v in enumerate(
                            row.get(key) for row in rows)))
    return f'{label}, {layer}: {verdicts[0]}; {verdicts[1]}.'


HEADERS = ('arm', 'MoE layer', *AP_FIGURES, 'active params', 's/iter',
           *(header for *_, header in NMIS))


def routing_table(figures: Dict[str, Dict[str, List[dict]]], labels: Dict[str, str]) -> str:
    """Markdown, one row per (arm, MoE layer): ``figures`` arm → layer → per seed."""
    from mmdet_moe.analysis.report import markdown_table
    rows = []
    for arm, layers in figures.items():
        for layer, runs in layers.items():
            rows.append([labels[arm], f'`{layer}`', *(plain_cell(runs, k) for k in AP_FIGURES),
                         f'{runs[0]["active"]:,}', plain_cell(runs, 'seconds_per_iter'),
                         *(nmi_cell(runs, key) for key, *_ in NMIS)])
    return markdown_table(list(HEADERS), rows)


def report_text(figures: Dict[str, Dict[str, List[dict]]], labels: Dict[str, str],
                seeds: Sequence[int]) -> str:
    sentences = [row_sentence(labels[arm], layer, runs)
                 for arm, layers in figures.items() for layer, runs in layers.items()]
    return '\n'.join([
        '# Routing granularity on the toy (`make demo-routing`)', '',
        f'Every arm trained alike on the toy data, seeds {", ".join(map(str, seeds))} (mean '
        '± sd over seeds, ddof=1; NMI: [the seeds\' mean 95 % bootstrap bounds] and '
        '(the mean of its shuffled baseline: across images and levels for NMI(expert; '
        'size), within each level for NMI(size | level), within each (image, level) for '
        'NMI(relative scale | level)); active parameters: per gate row; s/iter: median '
        'training iteration).', '',
        routing_table(figures, labels), '',
        *[f'- {sentence}' for sentence in sentences], ''])


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    arms = [arm for arm in ARMS if arm.name in args.arms]
    seeds = range(args.seeds)
    runs = [RoutingRun(args, arm, seed) for seed in seeds for arm in arms]
    if args.report_only:
        missing = [r.stats_path for r in runs if not osp.isfile(r.stats_path)]
        if missing:
            print(f'demo_routing: error: --report-only, but no statistics at {missing[0]}'
                  f' ({len(missing)} of {len(runs)} runs missing); train them first '
                  '(leave out --report-only)', file=sys.stderr)
            return 2
    else:
        prepare_dataset(args)
        for r in runs:
            r.train_and_evaluate(args)
    import mmdet_moe  # noqa: F401  (registers the modules the summaries name)
    figures = {}
    for arm in arms:
        per_seed = [r.layer_figures() for r in runs if r.arm == arm]
        figures[arm.name] = {layer: [seed[layer] for seed in per_seed if layer in seed]
                             for layer in per_seed[0]}
    text = report_text(figures, {arm.name: arm.label for arm in arms}, seeds)
    publish(text, osp.join(args.work_dir, REPORT), start)
    return 0


if __name__ == '__main__':
    sys.exit(main())
