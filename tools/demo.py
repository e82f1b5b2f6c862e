"""The main job on the embedded default: toy COCO data → MoE RetinaNet → report.

    python tools/demo.py                # what `make demo` runs
    python tools/demo.py --compare      # `make demo-compare`: dense, MoE soft, MoE hard
    python tools/demo.py --seeds 3      # the MoE detector for seeds 0, 1, 2: mean ± sd
    python tools/demo.py --seeds 3 --check   # `make demo-check`: within the README's spread?
    python tools/demo.py --paper        # `make demo-paper`: the paper's protocol
                                        # (tools/demo_paper.py, its own options)
    python tools/demo.py --routing      # `make demo-routing`: routing granularities
                                        # (tools/demo_routing.py, its own options)

1. generates the toy COCO dataset (tools/make_toy_coco.py) unless it exists;
2. trains each detector with the stock-style tools/train.py, seeded (``--seed``);
3. evaluates it with the COCO metric and ExpertSizeStatsHook and writes the report
   (tools/analyze_experts.py CONFIG CHECKPOINT), for the MoE detectors also with
   the routing forced to each expert and to all experts with equal weights;
4. prints a summary: AP, AP_S/M/L, the specialisation figures with their bootstrap
   intervals and baselines, the per-expert AP; with ``--compare`` a side-by-side
   table (AP, parameters total and active per image, seconds per training
   iteration); with ``--seeds`` the mean ± sd of every figure across seeds
   (tools/analyze_experts.py on the runs' statistics).

Every step is the same command a user would run; the options shrink it for tests.
"""
import argparse
import glob
import json
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import List, Optional

from analyze_experts import AP_KEYS  # tools/ is this script's sys.path[0]
from analyze_experts import mean_sd as seed_mean_sd

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY = osp.join(ROOT, 'configs', 'toy')
# name → (config, what it is); the first MoE variant is the demo's default
VARIANTS = {
    'dense': (osp.join(TOY, 'retinanet_r18_fpn_4e_toy-coco.py'), 'dense RetinaNet'),
    'moe-soft': (osp.join(TOY, 'retinanet_r18_fpn_moe-head_4e_toy-coco.py'),
                 'MoE soft (importance loss)'),
    'moe-hard': (osp.join(TOY, 'retinanet_r18_fpn_moe-head-hard_4e_toy-coco.py'),
                 'MoE hard (relative importance)'),
}
DEFAULT_VARIANT = 'moe-soft'
MAX_OBJECTS, DATA_SEED = 6, 0  # tools/make_toy_coco.py's defaults
# the default dataset (train images, val images, side) and its fingerprint, that of
# the data the README's figures were made on: another one means other data, not
# another training
DEFAULT_DATA, README_FINGERPRINT = (3000, 300, 256), '2fb5dc7e85ed'
# What the README states of the default demo (the default variant on the default
# dataset): each figure's mean and sd (ddof=1) over five runs of seeds 0, 1, 2: each
# with 2 threads, and seeds 0 and 1 again with 1 thread (which, like another CPU, rounds
# differently, so gives another draw of the same training). A run on another
# machine (or CPU instruction set) is one more draw of the same training, so `--check`
# asks every figure to lie within mean ± SPREAD_SDS sd, and AP to reach MIN_AP.
README_SPREAD = {'AP': (0.402, 0.031), 'AP_S': (0.254, 0.04), 'NMI': (0.35, 0.068),
                 'NMI | level': (0.0005, 0.0007)}
SPREAD_SDS, MIN_AP = 2, 0.30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Run the embedded MoE demo end to end')
    parser.add_argument('--config', default=None,
                        help='train this config instead of the demo\'s MoE detector')
    parser.add_argument('--compare', action='store_true',
                        help='train dense, MoE soft and MoE hard; print them side by side')
    parser.add_argument('--seed', type=int, default=0, help='random seed (randomness.seed)')
    parser.add_argument('--seeds', type=int, default=1,
                        help='train with seeds SEED, SEED+1, ...; mean ± sd across them')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'toy_coco'))
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    parser.add_argument('--train-images', type=int, default=DEFAULT_DATA[0])
    parser.add_argument('--val-images', type=int, default=DEFAULT_DATA[1])
    parser.add_argument('--image-size', type=int, default=DEFAULT_DATA[2])
    parser.add_argument('--epochs', type=int, default=None,
                        help='training epochs (default: the config\'s)')
    parser.add_argument('--no-per-expert', dest='per_expert', action='store_false',
                        help='skip the evaluations with routing forced to each expert')
    parser.add_argument('--regenerate', action='store_true', help='remake the dataset')
    parser.add_argument('--check', action='store_true',
                        help=f'exit 1 unless every run reaches AP {MIN_AP} and its figures '
                             f'lie within the README\'s mean ± {SPREAD_SDS} sd (default demo '
                             'and dataset only)')
    parser.add_argument('--tiny', action='store_true',
                        help='test settings: batch 2, no data-loader workers, log every iter')
    parser.add_argument('--paper', action='store_true',
                        help="the paper's protocol: dense model, then MoE head fine-tuned "
                             '(tools/demo_paper.py; see its --help for its options)')
    parser.add_argument('--routing', action='store_true',
                        help='routing per image, per location, per object and in the neck, '
                             'trained alike (tools/demo_routing.py; see its --help)')
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f'--seeds must be >= 1, got {args.seeds}')
    if args.compare and args.config:
        parser.error('--compare trains the three demo configs; it takes no --config')
    if args.config and not osp.isfile(args.config):
        parser.error(f'--config: no such file: {args.config}')
    if args.check and (args.config or args.compare or args.tiny or args.epochs
                       or not default_data(args)):
        parser.error('--check compares with the README\'s figures, made with the default '
                     f'detector, schedule and dataset {DEFAULT_DATA}: it takes no --config, '
                     '--compare, --tiny, --epochs or other dataset sizes')
    return args


def default_data(args) -> bool:
    """Whether the dataset asked for is the README's (train, val images, side)."""
    return (args.train_images, args.val_images, args.image_size) == DEFAULT_DATA


def run(step: str, command: list) -> None:
    print(f'\n==> [demo] {step}\n    {" ".join(command)}', flush=True)
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f'[demo] step failed: {step} (exit code {proc.returncode})')
    print(f'==> [demo] {step}: done in {time.time() - start:.0f} s', flush=True)


def overrides(args, seed: int, moe: bool) -> list:
    root = args.data_root.rstrip('/') + '/'
    options = {'val_evaluator.ann_file': root + 'val.json',
               'test_evaluator.ann_file': root + 'val.json',
               'randomness.seed': seed}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options[f'{loader}.dataset.data_root'] = root
    if args.epochs:
        # the toy configs decay the learning rate (cosine) over all epochs
        options.update({'train_cfg.max_epochs': args.epochs,
                        'default_hooks.checkpoint.interval': args.epochs,
                        'param_scheduler.1.T_max': args.epochs,
                        'param_scheduler.1.end': args.epochs})
    if args.tiny:
        options.update({'train_dataloader.batch_size': 2, 'default_hooks.logger.interval': 1})
        if moe:  # the toy MoE configs' ExpertUtilisationHook
            options['custom_hooks.1.interval'] = 1
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            options.update({f'{loader}.num_workers': 0,
                            f'{loader}.persistent_workers': False})
    if moe:  # a MoE detector is evaluated once, by analyze_experts (step 3); a dense
        # one by the training loop (it has no experts to report)
        options['train_cfg.val_begin'] = 10 ** 6  # (the loop validates at its last epoch)
    return ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]


def logged_scalars(work_dir: str) -> List[dict]:
    """The rows mmengine's LocalVisBackend wrote during the last training run."""
    logs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not logs:
        sys.exit(f'[demo] no training log (vis_data/scalars.json) in {work_dir}')
    with open(logs[-1]) as f:
        return [json.loads(line) for line in f]


def seconds_per_iteration(work_dir: str) -> Optional[float]:
    """Median ``time`` of the logged training iterations, the first logged interval
    left out (warm-up)."""
    times = [row['time'] for row in logged_scalars(work_dir) if 'lr' in row and 'time' in row]
    return statistics.median(times[1:] or times) if times else None


def parameter_counts(config: str):
    """Total and active-per-image parameters of the config's model."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    import mmdet_moe  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet_moe.layers import count_parameters
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return count_parameters(MODELS.build(cfg.model))


class Run:
    """One trained and evaluated detector: a variant at a seed."""

    def __init__(self, args, name: str, config: str, label: str, seed: int):
        self.name, self.config, self.label, self.seed = name, config, label, seed
        self.work_dir = osp.join(args.work_dir, f'{name}_seed{seed}')
        self.report_dir = osp.join(self.work_dir, 'report')
        self.stats_path = osp.join(self.work_dir, 'analyze', 'expert_size_stats.json')

    def options(self, args) -> list:
        """The ``--cfg-options`` of its training and evaluation."""
        return overrides(args, self.seed, self.is_moe)

    def train_and_evaluate(self, args) -> None:
        python = sys.executable
        options = self.options(args)
        run(f'train {self.label}, seed {self.seed} (tools/train.py)',
            [python, 'tools/train.py', self.config, '--work-dir', self.work_dir, *options])
        if not self.is_moe:
            return
        with open(osp.join(self.work_dir, 'last_checkpoint')) as f:
            checkpoint = f.read().strip()
        per_expert = ['--per-expert'] if args.per_expert else []
        run(f'evaluate {self.label} (COCO metric + expert statistics), write the report',
            [python, 'tools/analyze_experts.py', self.config, checkpoint, '--out-dir',
             self.report_dir, '--work-dir', osp.join(self.work_dir, 'analyze'),
             *per_expert, *options])

    @property
    def is_moe(self) -> bool:
        return self.name != 'dense'

    def metrics(self) -> List[dict]:
        """COCO AP rows: the learned routing first, then the forced ones (MoE)."""
        if self.is_moe:
            with open(osp.join(self.report_dir, 'metrics.json')) as f:
                return json.load(f)
        # the training loop's last validation (none logged: COCO found no detection)
        val = ([row for row in logged_scalars(self.work_dir) if 'coco/bbox_mAP' in row]
               or [{}])[-1]
        return [dict(routing='dense', **{k: val.get(key) for k, key in AP_KEYS.items()})]

    def stats(self) -> dict:
        with open(self.stats_path) as f:
            return json.load(f)


def publish(text: str, path: str, start: float) -> None:
    """Write a pipeline's report ``text`` to ``path`` (atomically), print it framed,
    and the time since ``start``."""
    from mmdet_moe.atomic_output import atomic_file
    with atomic_file(path) as tmp, open(tmp, 'w') as f:
        f.write(text)
    print('\n' + '=' * 72 + f'\n{text}\n(written to {path})\n' + '=' * 72)
    print(f'total time: {(time.time() - start) / 60:.1f} min')


def fmt(value, digits: int = 3) -> str:
    return 'n/a' if value is None or value < 0 else f'{value:.{digits}f}'


def mean_sd(values: list) -> str:
    """``mean ± sd`` (sd with ddof=1) of the available values (COCO gives -1 or
    nothing where it cannot compute an AP)."""
    values = [v for v in values if v is not None and v >= 0]
    if len(values) < 2:
        return f'n/a ({len(values)} run(s) with a value)'
    return '{:.3f} ± {:.3f}'.format(*seed_mean_sd(values))


def ap_line(row: dict) -> str:
    return ', '.join(f'{k} {fmt(row.get(k))}' for k in AP_KEYS)


def headline(run: Run) -> dict:
    """The figures README_SPREAD states, of one MoE run (its first MoE layer)."""
    from mmdet_moe.analysis import BUCKET_NAMES, layer_summary
    row = run.metrics()[0]
    layer = layer_summary(next(iter(run.stats()['layers'].values())), BUCKET_NAMES)
    return {'AP': row.get('AP'), 'AP_S': row.get('AP_S'), 'NMI': layer['nmi'],
            'NMI | level': layer['nmi_given_level']}


def against_readme(figures: dict) -> str:
    return ', '.join(f'{k} {fmt(figures[k], 4 if k.startswith("NMI") else 3)} '
                     f'(README {fmt(m, 4 if k.startswith("NMI") else 3)} ± '
                     f'{fmt(sd, 4 if k.startswith("NMI") else 3)})'
                     for k, (m, sd) in README_SPREAD.items())


def check_failures(runs: List[Run]) -> List[str]:
    """What keeps each run from the README's promise: AP below MIN_AP, a figure
    outside mean ± SPREAD_SDS sd."""
    failures = []
    for run in runs:
        figures = headline(run)
        if figures['AP'] is None or figures['AP'] < MIN_AP:
            failures.append(f'seed {run.seed}: AP {fmt(figures["AP"])} < {MIN_AP}')
        for key, (mean, sd) in README_SPREAD.items():
            low, high = mean - SPREAD_SDS * sd, mean + SPREAD_SDS * sd
            if figures[key] is None or not low <= figures[key] <= high:
                failures.append(f'seed {run.seed}: {key} {fmt(figures[key], 4)} outside the '
                                f'README\'s {mean} ± {SPREAD_SDS}×{sd} = [{low:.4f}, '
                                f'{high:.4f}]')
    return failures


def run_summary(run: Run, readme: bool = False) -> List[str]:
    """AP, the specialisation figures and the per-expert AP of one run; ``readme``:
    beside the README's mean ± sd over seeds."""
    from mmdet_moe.analysis import BUCKET_NAMES, layer_summary, specialisation_lines
    rows = run.metrics()
    lines = [f'{run.label}, seed {run.seed}: COCO bbox (toy val) {ap_line(rows[0])}']
    if not run.is_moe:
        return lines
    stats = run.stats()
    lines.append(f'{stats["num_detections"]} detections (score >= {stats["score_thr"]}) on '
                 f'{stats["num_images"]} images')
    for name, layer in stats['layers'].items():
        s = layer_summary(layer, BUCKET_NAMES)
        lines.append(f'{name}: living experts {s["living_experts"]}/{s["num_experts"]}; '
                     f'per expert, dominant size: '
                     f'{", ".join(str(d) for d in s["dominant_size"])}')
        lines += [f'  {line}' for line in specialisation_lines(s)]
    if len(rows) > 1:
        lines.append('COCO bbox AP with the routing forced (tools/analyze_experts.py '
                     '--per-expert):')
        lines += [f'  {row["routing"]:38s} {ap_line(row)}' for row in rows]
    if readme:
        lines.append('this run against the README (mean ± sd over 5 runs of seeds 0-2): '
                     + against_readme(headline(run)))
    lines.append(f'report: {osp.join(run.report_dir, "report.md")}')
    return lines


def comparison_table(runs: List[Run]) -> str:
    """Markdown: AP, parameters and training speed of each detector side by side."""
    from mmdet_moe.analysis.report import markdown_table
    header = ['detector', *AP_KEYS, 'params total', 'params active / image', 's / iter']
    rows = []
    for run in runs:
        row, counts = run.metrics()[0], parameter_counts(run.config)
        rows.append([run.label, *(fmt(row.get(k)) for k in AP_KEYS), f'{counts.total:,}',
                     f'{counts.active:,}', fmt(seconds_per_iteration(run.work_dir), 3)])
    return markdown_table(header, rows)


def stale_dataset(args) -> Optional[str]:
    """Why the dataset in ``--data-root`` is not the one asked for, or None."""
    from make_toy_coco import dataset_info  # tools/ is this script's sys.path[0]
    for split, images in (('train', args.train_images), ('val', args.val_images)):
        path = osp.join(args.data_root, f'{split}.json')
        if not osp.isfile(path):
            return f'no {path}'
        with open(path) as f:
            found = json.load(f).get('info')
        wanted = dataset_info(images, args.image_size, MAX_OBJECTS, DATA_SEED)
        if found != wanted:
            return f'{path} was made as {found}, the demo needs {wanted}'
    return None


def fingerprint_line(args) -> str:
    """The dataset's fingerprint, said against the README's for the default dataset."""
    from make_toy_coco import dataset_fingerprint  # tools/ is this script's sys.path[0]
    found = dataset_fingerprint(args.data_root)
    line = f'toy dataset {args.data_root}: fingerprint {found}'
    if not default_data(args):
        return line
    if found == README_FINGERPRINT:
        return line + " (the README's: the same data)"
    return line + (f" — NOT the README's {README_FINGERPRINT}: other data, so the "
                   "figures are not comparable (remake it with --regenerate)")


def prepare_dataset(args) -> str:
    """Generate the toy dataset into ``--data-root`` unless it is there; returns its
    fingerprint line."""
    stale = 'asked by --regenerate' if args.regenerate else stale_dataset(args)
    if stale:
        print(f'==> [demo] (re)making the dataset: {stale}')
        run('generate the toy COCO dataset',
            [sys.executable, 'tools/make_toy_coco.py', args.data_root,
             '--train', str(args.train_images), '--val', str(args.val_images),
             '--size', str(args.image_size), '--max-objects', str(MAX_OBJECTS),
             '--seed', str(DATA_SEED)])
    else:
        print(f'==> [demo] using the dataset in {args.data_root} (--regenerate to remake it)')
    data_line = fingerprint_line(args)
    print(f'==> [demo] {data_line}', flush=True)
    return data_line


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--paper' in argv:
        from demo_paper import main as paper_main  # tools/ is this script's sys.path[0]
        sys.exit(paper_main([a for a in argv if a != '--paper']))
    if '--routing' in argv:
        from demo_routing import main as routing_main
        sys.exit(routing_main([a for a in argv if a != '--routing']))
    args = parse_args(argv)
    start = time.time()
    data_line = prepare_dataset(args)
    if args.config:
        variants = [('custom', args.config, osp.basename(args.config))]
    else:
        names = list(VARIANTS) if args.compare else [DEFAULT_VARIANT]
        variants = [(name, *VARIANTS[name]) for name in names]
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [Run(args, name, config, label, seed)
            for seed in seeds for name, config, label in variants]
    for r in runs:
        r.train_and_evaluate(args)
    import mmdet_moe  # noqa: F401  (registers the modules the summaries name)
    lines = ['', '=' * 72, 'mmdet-moe demo: summary', '=' * 72, data_line, '']
    readme = default_data(args) and not args.config and not args.tiny and not args.epochs
    for r in runs:
        lines += run_summary(r, readme and r.name == DEFAULT_VARIANT) + ['']
    if args.compare:
        table = comparison_table([r for r in runs if r.seed == args.seed])
        with open(osp.join(args.work_dir, 'comparison.md'), 'w') as f:
            f.write(table + '\n')
        lines += [f'side by side, seed {args.seed} (also in '
                  f'{osp.join(args.work_dir, "comparison.md")}):', table, '']
    if args.seeds > 1:
        lines.append(f'mean ± sd over seeds {", ".join(map(str, seeds))}:')
        for name, _, label in variants:
            rows = [r.metrics()[0] for r in runs if r.name == name]
            lines.append(f'  {label:32s} ' + ', '.join(
                f'{k} {mean_sd([row[k] for row in rows])}' for k in AP_KEYS))
    print('\n'.join(lines), flush=True)
    if args.seeds > 1:
        for name, _, label in variants:
            paths = [r.stats_path for r in runs if r.name == name and r.is_moe]
            if not paths:
                continue
            run(f'{label}: mean ± sd over seeds {", ".join(map(str, seeds))}',
                [sys.executable, 'tools/analyze_experts.py', *paths, '--out-dir',
                 osp.join(args.work_dir, f'{name}_seeds')])
    print('=' * 72)
    print(f'total time: {(time.time() - start) / 60:.1f} min')
    if args.check:
        failures = check_failures([r for r in runs if r.name == DEFAULT_VARIANT])
        if failures:
            sys.exit('[demo] check FAILED:\n  ' + '\n  '.join(failures))
        print(f'[demo] check passed: every run reaches AP {MIN_AP} and lies within the '
              f'README\'s mean ± {SPREAD_SDS} sd')


if __name__ == '__main__':
    main()
