"""The main job on the embedded default: toy COCO data → MoE RetinaNet → report.

    python tools/demo.py            # what `make demo` runs

1. generates the toy COCO dataset (tools/make_toy_coco.py) unless it exists;
2. trains the toy MoE RetinaNet with the stock-style tools/train.py;
3. evaluates it with the COCO metric and ExpertSizeStatsHook and writes the
   report (tools/analyze_experts.py CONFIG CHECKPOINT);
4. prints a summary: AP, AP_S/M/L, per-layer NMI expert↔size against its shuffled
   baseline, and where the report is.

Every step is the same command a user would run; the options shrink it for tests.
"""
import argparse
import json
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join(ROOT, 'configs', 'toy', 'retinanet_r18_fpn_moe-head_12e_toy-coco.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Run the embedded MoE demo end to end')
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'toy_coco'))
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    parser.add_argument('--train-images', type=int, default=400)
    parser.add_argument('--val-images', type=int, default=100)
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=None,
                        help='training epochs (default: the config\'s)')
    parser.add_argument('--regenerate', action='store_true', help='remake the dataset')
    parser.add_argument('--tiny', action='store_true',
                        help='test settings: batch 2, no data-loader workers, log every iter')
    return parser.parse_args(argv)


def run(step: str, command: list) -> None:
    print(f'\n==> [demo] {step}\n    {" ".join(command)}', flush=True)
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f'[demo] step failed: {step} (exit code {proc.returncode})')
    print(f'==> [demo] {step}: done in {time.time() - start:.0f} s', flush=True)


def overrides(args) -> list:
    root = args.data_root.rstrip('/') + '/'
    options = {'val_evaluator.ann_file': root + 'val.json',
               'test_evaluator.ann_file': root + 'val.json'}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options[f'{loader}.dataset.data_root'] = root
    if args.epochs:
        options.update({'train_cfg.max_epochs': args.epochs,
                        'default_hooks.checkpoint.interval': args.epochs,
                        'param_scheduler.1.end': args.epochs,
                        'param_scheduler.1.milestones': f'[{max(args.epochs - 3, 1)}]'})
    if args.tiny:
        options.update({'train_dataloader.batch_size': 2, 'default_hooks.logger.interval': 1,
                        'custom_hooks.1.interval': 1})
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            options.update({f'{loader}.num_workers': 0,
                            f'{loader}.persistent_workers': False})
    # the demo evaluates once, after training (step 3)
    options['train_cfg.val_interval'] = 10 ** 6
    return ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]


def summary(work_dir: str, report_dir: str) -> str:
    with open(osp.join(report_dir, 'metrics.json')) as f:
        metrics = json.load(f)[0]
    with open(osp.join(work_dir, 'analyze', 'expert_size_stats.json')) as f:
        stats = json.load(f)
    import mmdet_moe  # noqa: F401
    from mmdet_moe.analysis import BUCKET_NAMES, layer_summary, specialisation_lines
    lines = ['', '=' * 72, 'mmdet-moe demo: summary', '=' * 72,
             'COCO bbox AP (toy val): ' + ', '.join(
                 f'{k} ' + ('n/a (no detection)' if metrics[k] is None else f'{metrics[k]:.3f}')
                 for k in ('AP', 'AP_S', 'AP_M', 'AP_L')),
             f'{stats["num_detections"]} detections (score >= {stats["score_thr"]}) on '
             f'{stats["num_images"]} images']
    for name, layer in stats['layers'].items():
        s = layer_summary(layer, BUCKET_NAMES)
        lines.append(f'{name}: living experts {s["living_experts"]}/{s["num_experts"]}; '
                     f'per expert, dominant size: '
                     f'{", ".join(str(d) for d in s["dominant_size"])}; most over-represented '
                     f'size: {", ".join(str(d) for d in s["over_represented_size"])}')
        lines += [f'  {line}' for line in specialisation_lines(s)]
    lines += [f'report: {osp.join(report_dir, "report.md")}', '=' * 72]
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    python = sys.executable
    start = time.time()
    if args.regenerate or not osp.isfile(osp.join(args.data_root, 'val.json')):
        run('generate the toy COCO dataset',
            [python, 'tools/make_toy_coco.py', args.data_root, '--train', str(args.train_images),
             '--val', str(args.val_images), '--size', str(args.image_size)])
    else:
        print(f'==> [demo] using the dataset in {args.data_root} (--regenerate to remake it)')
    options = overrides(args)
    run('train the MoE RetinaNet (tools/train.py)',
        [python, 'tools/train.py', args.config, '--work-dir', args.work_dir, *options])
    with open(osp.join(args.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    report_dir = osp.join(args.work_dir, 'report')
    run('evaluate (COCO metric + expert statistics) and write the report',
        [python, 'tools/analyze_experts.py', args.config, checkpoint, '--out-dir', report_dir,
         '--work-dir', osp.join(args.work_dir, 'analyze'), *options])
    print(summary(args.work_dir, report_dir))
    print(f'total time: {(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
    main()
