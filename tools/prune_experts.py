"""Remove rarely routed experts from a trained MoE detector.

    python tools/prune_experts.py CONFIG CHECKPOINT --out-dir DIR [--min-share 0.01]
        [--stats expert_size_stats.json] [--eval] [--work-dir WORK_DIR]
        [--cfg-options ...]

Each expert's share is its mean gate weight over all gate rows of the val set
(``Σ g / rows``, the figure behind the report's "living experts"): measured by running
the test loop on the config's val set, or read from ``--stats`` (an
``expert_size_stats.json`` of :class:`ExpertSizeStatsHook`). Experts whose share is
below ``--min-share`` are removed from every MoE layer (their weights, their gate's
rows, the per-expert buffers of hard constraints); layers sharing a gate keep the
experts any of them uses. Writes into ``--out-dir``:

- ``<config>_pruned.py``: the config, with ``MoEDetector(expert_counts=...)`` saying
  how many experts each pruned layer keeps (``tools/test.py``, ``init_detector`` and
  every stock tool load it with the checkpoint);
- ``<config>_pruned.pth``: the pruned weights (the kept experts renumbered in order);
- ``pruning.json``: every layer's shares and the experts kept and removed.

Removing experts that were never routed on the val set leaves every prediction
there unchanged (for gates whose kept weights are a softmax over the top k, the
default); ``--eval`` evaluates the pruned model on the val set and prints its AP
beside the original's (without ``--eval`` too, when routed experts were removed). Exit
code 2, with nothing written, for bad input: fewer
experts left than ``top_k`` (or 2), a layer without discrete experts (μMoE), a
checkpoint that does not match the config, statistics of another model.
"""
import json
import os.path as osp
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from mmdet_moe.analysis import check_stats, mean_gate_weights
from mmdet_moe.atomic_output import atomic_directory, check_replaceable
from mmdet_moe.engine.evaluation import (ap_line, default_work_dir, evaluate_on_val,
                                         load_checked, load_config, load_state_dict,
                                         model_parser, run_tool, write_model)
from mmdet_moe.layers import gate_groups, prune_model_experts
from mmdet_moe.models.stock_config import pruned_config

def parse_args(argv=None):
    parser = model_parser(
        'Remove experts below a share of the routing from a MoE detector')
    parser.add_argument('--out-dir', required=True, help='folder for the pruned config '
                        'and checkpoint (replaced as a whole; nothing written on error)')
    parser.add_argument('--min-share', type=float, default=0.01,
                        help='remove experts whose mean gate weight is below this')
    parser.add_argument('--stats', help='read the shares from this expert_size_stats.json '
                        'instead of running the val set')
    parser.add_argument('--eval', action='store_true',
                        help='evaluate the pruned model on the val set, print AP before '
                             'and after (done anyway when routed experts are removed)')
    parser.add_argument('--work-dir', help='work dir of the val runs')
    args = parser.parse_args(argv)
    if not 0 <= args.min_share < 1:
        parser.error(f'--min-share must be in [0, 1) (a share of the routing), got '
                     f'{args.min_share}')
    return args


def read_stats(path: str) -> dict:
    if not osp.isfile(path):
        raise FileNotFoundError(f'--stats: no statistics file at {path}')
    with open(path) as f:
        try:
            stats = json.load(f)
        except ValueError as err:
            raise ValueError(f'--stats: {path} is not valid JSON ({err})') from err
    check_stats(stats)
    return stats


def group_shares(model: torch.nn.Module, stats: dict, source: str) -> Dict[str, np.ndarray]:
    """Per gate group (keyed by its first module), each expert's largest share over
    the group's recorded modules."""
    shares = {}
    for first, names in gate_groups(model).items():
        num_experts = model.get_submodule(first).num_experts
        recorded = [n for n in names if n in stats['layers']]
        if not recorded:
            raise ValueError(f'{source} holds no statistics of MoE layer {first} (layers '
                             f'there: {sorted(stats["layers"])}); it must route on the val '
                             'set to be pruned')
        per_layer = []
        for name in recorded:
            layer = stats['layers'][name]
            if len(layer['importance']) != num_experts:
                raise ValueError(f'{source}: layer {name} has {len(layer["importance"])} '
                                 f'experts, the model {num_experts}: statistics of another '
                                 'model')
            per_layer.append(mean_gate_weights(layer['importance'], layer['rows']))
        shares[first] = np.max(per_layer, axis=0)
    return shares


def prune(args) -> dict:
    work_dir = args.work_dir or default_work_dir(args.config, 'prune_experts')
    check_replaceable(args.out_dir, [args.config, args.checkpoint, args.stats, work_dir],
                      'pruning.json')
    cfg = load_config(args.config, args.cfg_options)
    model = load_checked(cfg, args.checkpoint)
    before = None
    if args.stats:
        stats, source = read_stats(args.stats), args.stats
        before = stats.get('metrics')  # the evaluator's, where the hook kept them
    else:
        before, stats = evaluate_on_val(cfg, args.checkpoint, osp.join(work_dir, 'original'))
        source = 'the val set'
    shares = group_shares(model, stats, source)
    groups = gate_groups(model)
    keep, rows, unchanged = {}, [], True
    for first, group_share in shares.items():
        kept = [int(i) for i in np.flatnonzero(group_share >= args.min_share)]
        # removing never-routed experts changes nothing where the kept weights are a
        # softmax over the top k (a softmax over all N would lose their terms)
        unchanged &= bool((group_share[group_share < args.min_share] == 0).all()) and \
            getattr(model.get_submodule(first).gate, 'renormalize', True)
        for name in groups[first]:
            keep[name] = kept
        rows.append(dict(layers=groups[first], shares=group_share.tolist(), kept=kept,
                         removed=[i for i in range(len(group_share)) if i not in kept]))
    try:
        prune_model_experts(model, keep)
    except ValueError as err:
        raise ValueError(f'{err} (--min-share {args.min_share}; shares on {source}: '
                         + '; '.join(f'{r["layers"][0]} {np.round(r["shares"], 4).tolist()}'
                                     for r in rows) + ')') from err
    counts = {name: len(experts) for name, experts in keep.items()}
    stem = osp.splitext(osp.basename(args.config))[0] + '_pruned'
    _, meta = load_state_dict(args.checkpoint)
    removed = any(row['removed'] for row in rows)
    summary = dict(config=args.config, checkpoint=args.checkpoint, min_share=args.min_share,
                   shares_from=source, layers=rows, unchanged=unchanged or not removed)
    with atomic_directory(args.out_dir) as tmp:
        config_path, checkpoint_path = write_model(
            tmp, stem, pruned_config(cfg, counts), model, dict(meta, pruned_experts=rows))
        if args.eval or not summary['unchanged']:
            if before is None:
                before, _ = evaluate_on_val(cfg, args.checkpoint,
                                            osp.join(work_dir, 'original'), gate_stats=False)
            summary['metrics_after'], _ = evaluate_on_val(
                load_config(config_path), checkpoint_path, osp.join(work_dir, 'pruned'),
                gate_stats=False)
        summary['metrics_before'] = before
        with open(osp.join(tmp, 'pruning.json'), 'w') as f:
            json.dump(summary, f, indent=1, default=float)
    summary['files'] = [osp.join(args.out_dir, stem + ext) for ext in ('.py', '.pth')]
    return summary


def print_summary(summary: dict) -> None:
    print(f'experts below --min-share {summary["min_share"]} on {summary["shares_from"]}:')
    for row in summary['layers']:
        shares = ', '.join(f'{i}: {s:.4f}' for i, s in enumerate(row['shares']))
        print(f'  {" = ".join(row["layers"])}: shares {shares}; kept {row["kept"]}, '
              f'removed {row["removed"] or "none"}')
    if not any(row['removed'] for row in summary['layers']):
        print('no expert below --min-share: the pruned model is the original')
    elif summary['unchanged']:
        print(f'the removed experts were never routed on {summary["shares_from"]}: the '
              'pruned model predicts there what the original does')
    print(f'AP before: {ap_line(summary["metrics_before"])}')
    if 'metrics_after' in summary:
        print(f'AP after:  {ap_line(summary["metrics_after"])}')
    print('wrote ' + ' and '.join(summary['files']))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_tool('prune_experts', lambda: prune(args), print_summary)


if __name__ == '__main__':
    sys.exit(main())
