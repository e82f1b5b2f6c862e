"""Per-expert, per-size report of a MoE detector.

    # from statistics written by ExpertSizeStatsHook during val / test
    python tools/analyze_experts.py work_dirs/x/expert_size_stats.json --out-dir report/
    # or: run the test loop with the hook first
    python tools/analyze_experts.py CONFIG CHECKPOINT --out-dir report/ \\
        [--per-expert] [--k-sweep 1 3] [--score-thr 0.3] [--match-gt] [--cfg-options ...]

Writes ``report.md`` (tables per MoE layer: P(size | expert), P(expert | size),
dominant size, NMI expert↔size against its shuffled baseline, living experts,
per-level routing, class view), CSV files and PNG heatmaps; from CONFIG CHECKPOINT
also ``metrics.json`` (COCO AP of each evaluation). ``--per-expert``
evaluates the model with all routing forced to each expert in turn, and with each
k of ``--k-sweep``, and reports COCO AP, AP_S, AP_M, AP_L of each.
"""
import argparse
import json
import os.path as osp
import sys

from mmengine.config import Config, DictAction

from mmdet_moe.analysis import ReportError, check_stats, render_report

AP_KEYS = {'AP': 'coco/bbox_mAP', 'AP_S': 'coco/bbox_mAP_s', 'AP_M': 'coco/bbox_mAP_m',
           'AP_L': 'coco/bbox_mAP_l'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Report what each MoE expert learned')
    parser.add_argument('inputs', nargs='+',
                        help='STATS_JSON, or CONFIG CHECKPOINT to run the test loop first')
    parser.add_argument('--out-dir', required=True, help='report folder to write')
    parser.add_argument('--work-dir', help='work dir of the test run (CONFIG CHECKPOINT)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections with a lower score are not counted')
    parser.add_argument('--match-gt', action='store_true',
                        help='count only detections matching a GT box, by that box')
    parser.add_argument('--per-expert', action='store_true',
                        help='also evaluate with routing forced to each expert alone')
    parser.add_argument('--k-sweep', type=int, nargs='*', default=[],
                        help='also evaluate with each of these top-k')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, as in tools/test.py')
    args = parser.parse_args(argv)
    if len(args.inputs) not in (1, 2) or (len(args.inputs) == 1) != \
            args.inputs[0].endswith('.json'):
        parser.error('give either one STATS_JSON (*.json) or CONFIG CHECKPOINT, got '
                     f'{args.inputs}')
    if (args.per_expert or args.k_sweep) and len(args.inputs) == 1:
        parser.error('--per-expert / --k-sweep need CONFIG CHECKPOINT (they evaluate)')
    return args


def load_stats(path: str) -> dict:
    if not osp.isfile(path):
        raise ReportError(f'no statistics file at {path}')
    try:
        with open(path) as f:
            stats = json.load(f)
    except json.JSONDecodeError as err:
        raise ReportError(f'{path} is not valid JSON ({err})') from err
    check_stats(stats)
    return stats


def build_runner(args):
    """A Runner for the test loop with ExpertSizeStatsHook, from CONFIG CHECKPOINT."""
    from mmengine.runner import Runner
    import mmdet_moe  # noqa: F401
    config, checkpoint = args.inputs
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise ReportError(f'{what} file not found: {path}')
    cfg = Config.fromfile(config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or osp.join(
        'work_dirs', osp.splitext(osp.basename(config))[0], 'analyze_experts')
    cfg.load_from = checkpoint
    hooks = [h for h in cfg.get('custom_hooks', []) if h['type'] != 'ExpertSizeStatsHook']
    cfg.custom_hooks = hooks + [dict(type='ExpertSizeStatsHook', score_thr=args.score_thr,
                                     match_gt=args.match_gt)]
    runner = Runner.from_cfg(cfg)
    check_checkpoint(runner.model, checkpoint)
    return runner


def check_checkpoint(model, checkpoint: str) -> None:
    """mmengine loads ``load_from`` non-strictly (mismatches are only logged); the
    analysis of an unrelated checkpoint would be meaningless, so check it first."""
    import copy
    import torch
    state = torch.load(checkpoint, map_location='cpu')
    state = state.get('state_dict', state)
    try:
        missing, unexpected = copy.deepcopy(model).load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ReportError(f'the checkpoint {checkpoint} does not match the config: '
                          f'{str(err).splitlines()[1:3]}') from err
    if missing or unexpected:
        raise ReportError(f'the checkpoint {checkpoint} does not match the config: '
                          f'{len(missing)} keys missing (e.g. {missing[:3]}), '
                          f'{len(unexpected)} unexpected (e.g. {unexpected[:3]})')


def evaluate(runner, args):
    """Test with the learned routing, then forced routings; returns stats and AP rows."""
    from mmdet_moe.layers import override_routing
    from mmdet_moe.engine.hooks import write_stats
    from mmdet_moe.engine.hooks.gate_recording import unwrap
    metrics = runner.test()
    stats = load_stats(osp.join(runner.work_dir, 'expert_size_stats', 'test.json'))
    rows = [dict(routing='learned', **{k: metrics.get(v) for k, v in AP_KEYS.items()})]
    model = unwrap(runner.model)
    experts = max(layer['num_experts'] for layer in stats['layers'].values())
    forced = [(f'expert {e} alone', dict(expert=e))
              for e in range(experts if args.per_expert else 0)]
    forced += [(f'top-{k}', dict(top_k=k)) for k in args.k_sweep]
    for label, override in forced:
        runner.logger.info(f'analyze_experts: evaluating with routing forced to {label}')
        with override_routing(model, **override):
            result = runner.test()
        rows.append(dict(routing=label, **{k: result.get(v) for k, v in AP_KEYS.items()}))
    if forced:  # the forced runs rewrote the statistics files: put the learned ones back
        write_stats(stats, runner.work_dir, 'test')
    return stats, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if len(args.inputs) == 1:
            stats, forced = load_stats(args.inputs[0]), None
        else:
            stats, forced = evaluate(build_runner(args), args)
        report = render_report(stats, args.out_dir, forced)
    except ReportError as err:
        print(f'analyze_experts: error: {err}', file=sys.stderr)
        return 2
    print(f'report written to {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
