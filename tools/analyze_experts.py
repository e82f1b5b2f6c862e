"""Per-expert, per-size report of a MoE detector; seed stability of several runs.

    # from statistics written by ExpertSizeStatsHook during val / test
    python tools/analyze_experts.py work_dirs/x/expert_size_stats.json --out-dir report/
    # or: run the test loop with the hook first
    python tools/analyze_experts.py CONFIG CHECKPOINT --out-dir report/ \\
        [--per-expert] [--k-sweep 1 3] [--score-thr 0.3] [--match-gt] \\
        [--compute-shape H W] [--cfg-options ...]
    # seed stability: the statistics of runs that differ only in their seed
    python tools/analyze_experts.py s0/expert_size_stats.json s1/... s2/... --out-dir stab/

Writes ``report.md`` (tables per MoE layer: P(size | expert), P(expert | size),
dominant size, NMI expert↔size against its shuffled baseline, the within-level
scale measure NMI(expert; relative scale | level) against its baseline shuffled
within each (image, level), living experts,
per-level routing, class view), CSV files and PNG heatmaps; from CONFIG CHECKPOINT
also ``metrics.json`` (COCO AP of each evaluation) and an "Active compute" section
(``active_compute.csv``: per MoE layer and for the whole model, parameters total and
active per gate row, FLOPs per image at k and at N experts, counted as mmengine's
``get_model_complexity_info`` counts, on the first test image after the test pipeline,
or a zero image of ``--compute-shape H W``). ``--per-expert``
evaluates the model with all routing forced to each expert in turn, and to all
experts with equal weights 1/N (no gate, the paper's baseline), and with each k of
``--k-sweep``, and reports COCO AP, AP_S, AP_M, AP_L of each.

Given several statistics files, prints each figure of each run (per MoE layer: NMI,
level-conditioned NMI and NMI(expert; relative scale | level) where recorded, living
experts; COCO AP, AP_S, AP_M, AP_L where
the file holds the evaluator's ``metrics``) with its mean ± sd across runs (sd with
ddof=1), warns when a run's figure lies more than 2 sd from the mean of the other
runs, and writes ``seed_stability.md`` and ``seed_stability.csv`` into ``--out-dir``.
"""
import argparse
import json
import math
import os.path as osp
import sys
from numbers import Integral, Real
from typing import Dict, List, Optional, Tuple

import numpy as np
from mmengine.config import Config, DictAction

from mmdet_moe.analysis import (BUCKET_NAMES, ReportError, check_stats, layer_summary,
                                render_report, specialisation_lines)
from mmdet_moe.analysis.report import active_compute_table, markdown_table, write_csv
from mmdet_moe.atomic_output import atomic_directory

AP_KEYS = {'AP': 'coco/bbox_mAP', 'AP_S': 'coco/bbox_mAP_s', 'AP_M': 'coco/bbox_mAP_m',
           'AP_L': 'coco/bbox_mAP_l'}
EQUAL_WEIGHTS_ROW = 'all experts, equal weights (no gate)'
# per-layer figures of layer_summary() compared across seeds
LAYER_FIGURES = ('nmi', 'nmi_given_level', 'nmi_rel_scale_given_level', 'living_experts')
OUTLIER_SD = 2.0  # a run is flagged beyond this many sd of the other runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Report what each MoE expert learned, or the seed stability of '
                    'several runs')
    parser.add_argument('inputs', nargs='+',
                        help='STATS_JSON; several STATS_JSON of runs that differ only in '
                             'their seed; or CONFIG CHECKPOINT to run the test loop first')
    parser.add_argument('--out-dir', required=True, help='report folder to write')
    parser.add_argument('--work-dir', help='work dir of the test run (CONFIG CHECKPOINT)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections with a lower score are not counted')
    parser.add_argument('--match-gt', action='store_true',
                        help='count only detections matching a GT box, by that box')
    parser.add_argument('--per-expert', action='store_true',
                        help='also evaluate with routing forced to each expert alone and '
                             'to all experts with equal weights (no gate)')
    parser.add_argument('--k-sweep', type=int, nargs='*', default=[],
                        help='also evaluate with each of these top-k')
    parser.add_argument('--compute-shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='image size of the active-compute section (CONFIG CHECKPOINT); '
                             'default: the first test image after the test pipeline')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, as in tools/test.py')
    args = parser.parse_args(argv)
    is_json = [path.endswith('.json') for path in args.inputs]
    if not all(is_json) and (len(args.inputs) != 2 or any(is_json)):
        not_json = [p for p, j in zip(args.inputs, is_json) if not j]
        why = (f'{not_json} not .json statistics files' if any(is_json) else
               f'{len(args.inputs)} paths that are not .json statistics files, '
               'CONFIG CHECKPOINT is 2 paths')
        parser.error('give one STATS_JSON (*.json), several STATS_JSON (runs that differ '
                     f'only in their seed) or CONFIG CHECKPOINT; got {args.inputs}: {why}')
    if (args.per_expert or args.k_sweep) and all(is_json):
        parser.error('--per-expert / --k-sweep need CONFIG CHECKPOINT (they evaluate)')
    if args.compute_shape and all(is_json):
        parser.error('--compute-shape needs CONFIG CHECKPOINT (it runs the model)')
    if args.compute_shape and min(args.compute_shape) < 1:
        parser.error(f'--compute-shape: H and W must be >= 1, got {args.compute_shape}')
    for k in args.k_sweep:
        if k < 1:
            parser.error(f'--k-sweep: every k must be >= 1, got {k}')
    duplicates = sorted({p for p in args.inputs if args.inputs.count(p) > 1})
    if duplicates and all(is_json):
        parser.error(f'statistics file given more than once: {duplicates}')
    return args


def load_stats(path: str) -> dict:
    """The statistics in ``path``, validated; a ReportError names the file and what
    in it is wrong (for single files and seed runs alike)."""
    if not osp.isfile(path):
        raise ReportError(f'no statistics file at {path}')
    try:
        with open(path) as f:
            stats = json.load(f)
    except OSError as err:
        raise ReportError(f'cannot read {path}: {err.strerror}') from err
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ReportError(f'{path} is not valid JSON ({err})') from err
    try:
        check_stats(stats)  # validate_stats, then: layers and images to report on
    except ReportError as err:
        raise ReportError(f'{path}: {err}') from err
    return stats


def build_runner(args):
    """A Runner for the test loop with ExpertSizeStatsHook, from CONFIG CHECKPOINT."""
    import mmdet_moe  # noqa: F401
    from mmdet_moe.engine.evaluation import (CheckpointMismatchError, default_work_dir,
                                             test_runner)
    config, checkpoint = args.inputs
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise ReportError(f'{what} file not found: {path}')
    cfg = Config.fromfile(config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    work_dir = args.work_dir or default_work_dir(config, 'analyze_experts')
    try:
        runner = test_runner(cfg, checkpoint, work_dir, dict(
            type='ExpertSizeStatsHook', score_thr=args.score_thr, match_gt=args.match_gt))
    except CheckpointMismatchError as err:
        raise ReportError(str(err)) from err
    return runner


def evaluate(runner, args):
    """Test with the learned routing, then forced routings; returns stats and AP rows."""
    from mmdet_moe.engine.hooks import write_stats
    from mmdet_moe.engine.hooks.gate_recording import unwrap
    from mmdet_moe.layers import is_moe_module, override_routing
    model = unwrap(runner.model)
    experts = max((m.num_experts for m in model.modules() if is_moe_module(m)), default=0)
    forced = [(f'expert {e} alone', dict(expert=e))
              for e in range(experts if args.per_expert else 0)]
    if args.per_expert:
        forced.append((EQUAL_WEIGHTS_ROW, dict(equal_weights=True)))
    forced += [(f'top-{k}', dict(top_k=k)) for k in args.k_sweep]
    for label, override in forced:  # check every override before the long evaluations
        try:
            with override_routing(model, **override):
                pass
        except ValueError as err:
            raise ReportError(f'cannot force routing to {label}: {err}') from err
    metrics = runner.test()
    stats = load_stats(osp.join(runner.work_dir, 'expert_size_stats', 'test.json'))
    rows = [dict(routing='learned', **{k: metrics.get(v) for k, v in AP_KEYS.items()})]
    for label, override in forced:
        runner.logger.info(f'analyze_experts: evaluating with routing forced to {label}')
        with override_routing(model, **override):
            result = runner.test()
        rows.append(dict(routing=label, **{k: result.get(v) for k, v in AP_KEYS.items()}))
    if forced:  # the forced runs rewrote the statistics files: put the learned ones back
        write_stats(stats, runner.work_dir, 'test')
    return stats, rows


def active_compute(runner, shape: Optional[List[int]]) -> dict:
    """Parameters and FLOPs per image of the model and each of its MoE layers
    (:func:`~mmdet_moe.layers.count_active_compute`) on the first test image after
    the test pipeline and data preprocessor, or on a zero image of ``shape`` (H, W);
    ``dict(input_shape=(H, W), rows=[...])`` for :func:`render_report`."""
    import torch
    from mmdet_moe.engine.hooks.gate_recording import unwrap
    from mmdet_moe.layers import count_active_compute
    from mmdet.structures import DetDataSample
    model = unwrap(runner.model)
    if shape is None:
        batch = model.data_preprocessor(next(iter(runner.test_loop.dataloader)), False)
        inputs, samples = batch['inputs'][:1], batch['data_samples'][:1]
    else:
        inputs = torch.zeros(1, 3, *shape, device=next(model.parameters()).device)
        size = tuple(shape)
        samples = [DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size,
                                               batch_input_shape=size, scale_factor=(1., 1.)))]
    # with data samples: a two-stage detector's tensor forward runs the RPN's predict,
    # which reads each image's metainfo
    rows = count_active_compute(model, inputs, samples).rows()
    return dict(input_shape=tuple(inputs.shape[-2:]), rows=rows)


def _number(value, what: str) -> Optional[float]:
    """A finite float, None for a missing or non-finite figure."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ReportError(f'{what} is {value!r}, not a number')
    if isinstance(value, Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


NO_LEVELS = ('statistics without level information; the level-controlled view needs '
             'a new run')
NO_METRICS = ("the file has no 'metrics': written before mmdet_moe kept the evaluator's "
              'metrics, or without an evaluator')
NO_DETECTIONS = ('no detection above score_thr: its only NMI is of the image view, not '
                 'comparable with the detection-view NMIs of other runs')


def run_figures(path: str, stats: dict) -> Tuple[Dict[Tuple[str, str], Optional[float]],
                                                  Dict[Tuple[str, str], str]]:
    """The figures of one run keyed (layer or 'detector', figure), and why each
    missing figure is missing."""
    figures, missing = {}, {}
    for name, layer in stats['layers'].items():
        summary = layer_summary(layer, BUCKET_NAMES)
        for key in LAYER_FIGURES:
            if key.startswith('nmi') and summary.get('view') == 'image':
                figures[(name, key)], missing[(name, key)] = None, NO_DETECTIONS
                continue
            figures[(name, key)] = _number(summary.get(key), f'{path}: {name} {key}')
            if figures[(name, key)] is None:
                missing[(name, key)] = {
                    'nmi_given_level': NO_LEVELS,
                    'nmi_rel_scale_given_level': summary['rel_scale_absent']}.get(
                        key, f'layer_summary gives {summary.get(key)!r}')
    metrics = stats.get('metrics')
    if metrics is not None and not isinstance(metrics, dict):
        raise ReportError(f"{path}: 'metrics' must be a dict of the evaluator's metrics, "
                          f'got {metrics!r}')
    for figure, key in AP_KEYS.items():
        value = None if metrics is None else _number(metrics.get(key), f'{path}: {key}')
        if metrics is None:
            missing[('detector', figure)] = NO_METRICS
        elif value is None or value < 0:
            missing[('detector', figure)] = (
                f'{key} is {metrics.get(key)!r}' + ('; COCO gives -1 without ground truth '
                                                    'of that size' if value is not None else ''))
            value = None
        figures[('detector', figure)] = value
    return figures, missing


def missing_notes(paths: List[str], missing: List[Dict[Tuple[str, str], str]]) -> List[str]:
    """One line per reason: which figures are unavailable in which run (or in every
    run), and why."""
    def label(key, reason):
        scope, figure = key
        if scope == 'detector':
            return 'AP' if reason == NO_METRICS else figure
        return f'{scope} {figure}'
    everywhere = set(missing[0].items()).intersection(*(m.items() for m in missing[1:]))
    lines = {}  # (where, reason) -> labels, in order
    for key, reason in missing[0].items():
        if (key, reason) in everywhere:
            lines.setdefault(('every run', reason), []).append(label(key, reason))
    for path, reasons in zip(paths, missing):
        for key, reason in reasons.items():
            if (key, reason) not in everywhere:
                lines.setdefault((path, reason), []).append(label(key, reason))
    notes = []
    for (where, reason), labels in lines.items():
        labels = list(dict.fromkeys(labels))
        notes.append(f'{", ".join(labels)} unavailable in every run ({reason})'
                     if where == 'every run' else
                     f'{where}: {", ".join(labels)} unavailable ({reason})')
    return notes


def load_runs(paths: List[str]) -> List[dict]:
    """Load the statistics of runs that differ only in their seed; they must hold the
    same MoE layers with the same numbers of experts."""
    runs = [load_stats(path) for path in paths]
    first = runs[0]['layers']
    for path, stats in zip(paths[1:], runs[1:]):
        layers = stats['layers']
        if set(layers) != set(first):
            raise ReportError(
                f'{path} holds MoE layers {sorted(layers)}, {paths[0]} holds '
                f'{sorted(first)}: seed runs must share their layers '
                f'(missing {sorted(set(first) - set(layers))}, extra '
                f'{sorted(set(layers) - set(first))})')
        for name, layer in layers.items():
            if layer['num_experts'] != first[name]['num_experts']:
                raise ReportError(f'{path}: layer {name} has {layer["num_experts"]} experts, '
                                  f'{first[name]["num_experts"]} in {paths[0]}')
    return runs


def mean_sd(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample sd (ddof=1) of the values; None where undefined."""
    if not values:
        return None, None
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def outliers(label: str, values: List[Optional[float]], paths: List[str]) -> List[str]:
    """WARNING lines for each run whose value lies more than OUTLIER_SD sd (ddof=1) from
    the mean of the other runs (needs at least two other runs with the figure)."""
    warnings = []
    for i, value in enumerate(values):
        others = [v for j, v in enumerate(values) if j != i and v is not None]
        if value is None or len(others) < 2:
            continue
        mean, sd = mean_sd(others)
        distance = abs(value - mean)
        if distance > OUTLIER_SD * sd + 1e-9 * max(1.0, abs(mean)):
            how_far = (f'{distance / sd:.1f} sd' if sd > 0 else
                       f'{distance:.4g}, beyond {OUTLIER_SD:g} sd (sd 0),')
            warnings.append(
                f'WARNING: run {paths[i]}: {label} = {value:.4f} lies {how_far} from the '
                f'mean of the other runs ({mean:.4f} ± {sd:.4f}, {len(others)} runs; '
                f'threshold {OUTLIER_SD:g} sd)')
    return warnings


def seed_stability(paths: List[str], out_dir: str) -> str:
    """Print and write mean ± sd of every figure across runs; returns the markdown path."""
    runs = load_runs(paths)
    per_run, missing = zip(*(run_figures(path, stats) for path, stats in zip(paths, runs)))
    notes = missing_notes(paths, missing)
    evaluated = {(stats['mode'], stats['num_images']) for stats in runs}
    if len(evaluated) > 1:
        notes.insert(0, 'the runs were not evaluated alike (mode, images): '
                     f'{sorted(evaluated)}; seed runs should share their test set')
    keys = list(per_run[0])
    run_names = [f'run {i + 1}' for i in range(len(paths))]
    md_rows, csv_rows, warnings = [], [], []
    for key in keys:
        values = [figures[key] for figures in per_run]
        available = [v for v in values if v is not None]
        if not available:
            continue  # e.g. AP or the level-conditioned NMI in none of the runs
        mean, sd = mean_sd(available)
        label = key[1] if key[0] == 'detector' else f'{key[0]} {key[1]}'
        shown = f'{mean:.4f} ± {sd:.4f}' if sd is not None else f'{mean:.4f} (one run)'
        md_rows.append([key[0], key[1], *values, shown, len(available)])
        csv_rows.append([key[0], key[1], *values, mean, sd, len(available)])
        warnings += outliers(label, values, paths)
    if not md_rows:
        raise ReportError('the runs hold no figure to compare')
    md_header = ['layer', 'figure', *run_names, 'mean ± sd', 'runs']
    csv_header = ['layer', 'figure', *paths, 'mean', 'sd', 'runs']
    legend = [f'- {name}: `{path}` ({stats["mode"]}, {stats["num_images"]} images)'
              for name, path, stats in zip(run_names, paths, runs)]
    table = markdown_table(md_header, md_rows, digits=4)
    lines = ['# Seed stability', '',
             f'{len(paths)} runs; mean ± sd across runs (sd with ddof=1). A run is flagged '
             f'when a figure lies more than {OUTLIER_SD:g} sd from the mean of the other '
             'runs.', '', *legend, '', table, '']
    if notes:
        lines += ['## Notes', '', *[f'- {n}' for n in notes], '']
    if warnings:
        lines += ['## Warnings', '', *[f'- {w}' for w in warnings], '']
    with atomic_directory(out_dir) as tmp:
        write_csv(osp.join(tmp, 'seed_stability.csv'), csv_header, csv_rows)
        with open(osp.join(tmp, 'seed_stability.md'), 'w') as f:
            f.write('\n'.join(lines))
    print(f'seed stability over {len(paths)} runs (mean ± sd, sd with ddof=1):')
    print('\n'.join(legend))
    print(table)
    for note in notes:
        print(f'note: {note}')
    if len(paths) < 3:
        print(f'note: the outlier check compares each run with the sd of the other runs '
              f'and needs 3 runs or more; got {len(paths)}')
    for warning in warnings:
        print(warning)
    return osp.join(out_dir, 'seed_stability.md')


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if len(args.inputs) > 1 and all(p.endswith('.json') for p in args.inputs):
            report = seed_stability(args.inputs, args.out_dir)
        else:
            if len(args.inputs) == 1:
                stats, forced, compute = load_stats(args.inputs[0]), None, None
            else:
                runner = build_runner(args)
                stats, forced = evaluate(runner, args)
                compute = active_compute(runner, args.compute_shape)
                height, width = compute['input_shape']
                print(f'active compute, {height}×{width} image (per image; FLOPs as '
                      "mmengine's get_model_complexity_info counts them):\n" +
                      markdown_table(*active_compute_table(compute['rows'])))
            report = render_report(stats, args.out_dir, forced, compute)
            for name, layer in stats['layers'].items():
                summary = layer_summary(layer, BUCKET_NAMES)
                print('\n  '.join([name, *specialisation_lines(summary)]))
    except ReportError as err:
        print(f'analyze_experts: error: {err}', file=sys.stderr)
        return 2
    print(f'report written to {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
