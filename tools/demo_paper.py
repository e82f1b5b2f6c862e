"""The paper's protocol on the toy: a trained dense RetinaNet, then only its head's
classification branch fine-tuned as a MoE (Pavlitska et al., arXiv 2204.10598).

    python tools/demo.py --paper        # what `make demo-paper` runs
    python tools/demo_paper.py --seeds 1 --dense-checkpoint work_dirs/x/epoch_4.pth

1. generates the toy COCO dataset as `make demo` does (tools/demo.py's step);
2. the dense toy RetinaNet (seed 0): ``--dense-checkpoint``, else the one `make
   demo-compare` wrote (``work_dirs/demo/dense_seed0``), else the one an earlier run
   trained (``<work-dir>/dense_seed0``), else trained there; checked against the dense
   config before any fine-tuning;
3. fine-tunes every arm (ARMS) from it for each seed, everything but the classification
   branch frozen (configs/toy/*_ft-from-dense_toy-coco.py): the soft constraint, the
   hard one and equal weights, each with fresh experts and experts copied from the
   dense branch (with and without upcycle noise), and the dense branch itself (the
   control: what fine-tuning alone gives);
4. evaluates each MoE arm with tools/analyze_experts.py (the control in its training
   loop), as tools/demo.py does;
5. prints and writes ``<work-dir>/paper_protocol.md``: per arm AP, AP_S/M/L, living
   experts, importance CV, NMI(expert; size), NMI(size | level), wall time, as mean ±
   sd over seeds, and whether the toy supports each of the paper's three claims.
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

from analyze_experts import mean_sd as seed_mean_sd  # tools/ is sys.path[0]
from demo import DEFAULT_DATA, ROOT, TOY, VARIANTS, Run, mean_sd, prepare_dataset, publish

DENSE_CONFIG = VARIANTS['dense'][0]
# the dense branch the MoE arms replace: what the control trains, and what fresh
# experts do not start from
CLS_BRANCH = ('bbox_head.cls_convs', 'bbox_head.retina_cls')
UPCYCLE_NOISE_STD = 0.01  # × std of each copied tensor, as the COCO ft-from-dense config


def ft_config(head: str) -> str:
    return osp.join(TOY, f'retinanet_r18_fpn_{head}ft-from-dense_toy-coco.py')


class Arm(NamedTuple):
    """One fine-tuning arm: ``init`` is 'fresh', 'copied' or 'noisy' (copied with
    upcycle noise) for MoE arms, None for the dense control."""
    name: str
    config: str
    init: Optional[str]
    label: str


INITS = {'fresh': 'fresh experts', 'copied': 'copied experts',
         'noisy': f'copied experts + noise {UPCYCLE_NOISE_STD}'}
CONSTRAINTS = {'soft': 'soft (KL to uniform)', 'hard': 'hard (relative importance)',
               'equal': 'equal weights (no gate)'}
# equal weights on copies without noise is the dense head itself (identical experts get
# identical gradients and stay identical): the control covers it
ARMS = [Arm('control', ft_config(''), None, 'dense head (control)')] + [
    Arm(f'{constraint}-{init}', ft_config(f'moe-head-{constraint}_'), init,
        f'{CONSTRAINTS[constraint]}, {INITS[init]}')
    for constraint in CONSTRAINTS for init in INITS
    if (constraint, init) != ('equal', 'copied')]
REPORT = 'paper_protocol.md'


class PaperDemoError(Exception):
    """Bad input to the pipeline, found before it trains anything."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The paper's protocol on the toy: dense RetinaNet, then the MoE "
                    'head fine-tuned with the rest frozen (`make demo-paper`)')
    parser.add_argument('--seeds', type=int, default=3,
                        help='fine-tune every arm with seeds 0 … SEEDS-1; mean ± sd')
    parser.add_argument('--dense-checkpoint',
                        help='the trained dense toy RetinaNet to start from (default: '
                             "`make demo-compare`'s, else an earlier run's, else trained)")
    parser.add_argument('--no-train-dense', dest='train_dense', action='store_false',
                        help='fail instead of training the dense model when none is found')
    parser.add_argument('--compare-work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'),
                        help="where `make demo-compare` trained the dense model "
                             '(its dense_seed0 is reused)')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'toy_coco'))
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo_paper'))
    parser.add_argument('--train-images', type=int, default=DEFAULT_DATA[0])
    parser.add_argument('--val-images', type=int, default=DEFAULT_DATA[1])
    parser.add_argument('--image-size', type=int, default=DEFAULT_DATA[2])
    parser.add_argument('--dense-epochs', type=int, default=None,
                        help="epochs of the dense training (default: the config's)")
    parser.add_argument('--iters', type=int, default=None,
                        help="fine-tuning iterations (default: the configs'; the lr steps "
                             'down at 2/3 of them)')
    parser.add_argument('--regenerate', action='store_true', help='remake the dataset')
    parser.add_argument('--tiny', action='store_true',
                        help='test settings: batch 2, no data-loader workers, log every iter')
    # what tools/demo.py's steps read: the evaluations are without forced routings,
    # the epochs are the dense training's (PaperRun.options drops them)
    parser.set_defaults(per_expert=False)
    args = parser.parse_args(argv)
    args.epochs = args.dense_epochs
    for name in ('seeds', 'dense_epochs', 'iters'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    if args.dense_checkpoint and not osp.isfile(args.dense_checkpoint):
        parser.error(f'--dense-checkpoint: no such file: {args.dense_checkpoint}')
    return args


def last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint a finished training in ``work_dir`` points to, or None."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        path = f.read().strip()
    return path if osp.isfile(path) else None


def find_dense_checkpoint(args) -> Optional[str]:
    """The dense checkpoint to start from, None to train it; PaperDemoError when none
    is found and ``--no-train-dense`` forbids training it."""
    if args.dense_checkpoint:
        return args.dense_checkpoint
    folders = [osp.join(args.compare_work_dir, 'dense_seed0'),
               osp.join(args.work_dir, 'dense_seed0')]
    for folder in folders:
        found = last_checkpoint(folder)
        if found:
            return found
    if args.train_dense:
        return None
    raise PaperDemoError(
        'no dense checkpoint to fine-tune from: no --dense-checkpoint given, and no '
        + ' nor '.join(osp.join(f, 'last_checkpoint') for f in folders)
        + ' pointing to one (`make demo-compare` writes the first); give '
        '--dense-checkpoint PATH, or leave out --no-train-dense to train it here')


def check_dense_checkpoint(checkpoint: str) -> None:
    """PaperDemoError unless ``checkpoint`` holds the dense toy RetinaNet's weights,
    key for key and shape for shape."""
    import mmdet_moe  # noqa: F401  (mmengine checkpoints load with the safe loader)
    from mmdet_moe.engine.evaluation import (build_model, key_mismatch, load_config,
                                             load_state_dict)
    model = build_model(load_config(DENSE_CONFIG))
    mismatch = key_mismatch(model.state_dict(), load_state_dict(checkpoint)[0])
    if mismatch:
        raise PaperDemoError(
            f'the dense checkpoint {checkpoint} is not of {osp.relpath(DENSE_CONFIG, ROOT)} '
            f'(the dense toy RetinaNet): {mismatch}')


def write_without_branch(checkpoint: str, out_path: str) -> str:
    """Write ``checkpoint`` less the dense classification branch (CLS_BRANCH) to
    ``out_path`` (atomically): loaded into a MoE arm, nothing is upcycled and the
    experts keep their fresh initialisation. Returns ``out_path``."""
    import torch
    from mmdet_moe.atomic_output import atomic_file
    from mmdet_moe.engine.evaluation import load_state_dict
    state, meta = load_state_dict(checkpoint)
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(
        f'{prefix}.' for prefix in CLS_BRANCH))}
    with atomic_file(out_path) as tmp:
        torch.save(dict(meta=meta, state_dict=kept), tmp)
    return out_path


class PaperRun(Run):
    """One arm fine-tuned from the dense checkpoint at a seed, then evaluated."""

    def __init__(self, args, arm: Arm, seed: int, load_from: str):
        super().__init__(args, arm.name, arm.config, arm.label, seed)
        self.arm, self.load_from, self.seconds = arm, load_from, None

    @property
    def is_moe(self) -> bool:
        return self.arm.init is not None

    def options(self, args) -> list:
        # the configs' own schedule: tools/demo.py's epoch overrides are the dense model's
        options = super().options(argparse.Namespace(**dict(vars(args), epochs=None)))
        options.append(f'load_from={self.load_from}')
        if self.is_moe:
            noise = UPCYCLE_NOISE_STD if self.arm.init == 'noisy' else 0.0
            options.append(f'model.bbox_head.upcycle_noise_std={noise}')
        if args.iters:
            options += [f'train_cfg.max_iters={args.iters}',
                        f'train_cfg.val_interval={args.iters}',
                        f'default_hooks.checkpoint.interval={args.iters}',
                        f'param_scheduler.0.milestones=[{max(1, 2 * args.iters // 3)}]']
        return options

    def train_and_evaluate(self, args) -> None:
        start = time.time()
        super().train_and_evaluate(args)
        self.seconds = time.time() - start

    def figures(self) -> Dict[str, Optional[float]]:
        """AP, AP_S/M/L and, for a MoE arm, its layer's utilisation and specialisation
        figures with the NMIs' interval bounds (None where there are none), and the
        wall time."""
        from mmdet_moe.analysis import BUCKET_NAMES, layer_summary
        figures = {k: v for k, v in self.metrics()[0].items() if k != 'routing'}
        summary = {}
        if self.is_moe:
            summary = layer_summary(self.stats()['layers']['bbox_head.cls_moe'],
                                    BUCKET_NAMES)
        for key in FIGURES[4:]:
            figures[key] = summary.get(key)
        for key in ('nmi', 'nmi_given_level'):
            if summary.get('view') == 'image':  # no detection above score_thr: its NMI
                figures[key] = None  # is the image view's, not comparable (no interval)
            lower, upper = summary.get(f'{key}_interval') or (None, None)
            figures.update({f'{key}_lower': lower, f'{key}_upper': upper})
        figures['seconds'] = self.seconds
        return figures


# table columns, after the arm: (figure, header)
FIGURES = ('AP', 'AP_S', 'AP_M', 'AP_L', 'living_experts', 'importance_cv', 'nmi',
           'nmi_given_level')
HEADERS = ('AP', 'AP_S', 'AP_M', 'AP_L', 'living experts', 'importance CV',
           'NMI(expert; size) [95 % interval]', 'NMI(size | level) [95 % interval]',
           'wall time (s)')


def values(rows: Sequence[dict], key: str) -> List[float]:
    """The seeds' values of a figure, less the missing ones (None, or COCO's -1)."""
    return [row[key] for row in rows if row.get(key) is not None and row[key] >= 0]


def cell(rows: Sequence[dict], key: str) -> str:
    """``mean ± sd`` over seeds (as tools/demo.py), a lone value as it is, ``–``
    for a figure the arm does not have (the dense control's expert figures)."""
    found = values(rows, key)
    if not found:
        return '–'
    text = f'{found[0]:.3f}' if len(found) == 1 else mean_sd(found)
    if key.startswith('nmi') and values(rows, f'{key}_lower'):
        lower, upper = (statistics.mean(values(rows, f'{key}_{end}'))
                        for end in ('lower', 'upper'))
        text += f' [{lower:.3f}, {upper:.3f}]'
    return text


def protocol_table(figures: Dict[str, List[dict]], labels: Dict[str, str]) -> str:
    """Markdown, one row per arm (``figures``: arm name → one dict per seed)."""
    from mmdet_moe.analysis.report import markdown_table
    rows = []
    for name, runs in figures.items():
        mean, sd = seed_mean_sd(values(runs, 'seconds'))
        seconds = '–' if mean is None else f'{mean:.0f}' + (f' ± {sd:.0f}' if sd else '')
        rows.append([labels[name], *(cell(runs, key) for key in FIGURES), seconds])
    return markdown_table(['arm', *HEADERS], rows)


class Comparison(NamedTuple):
    """One arm against another on ``figure``: ``outcome`` as :func:`compare` says,
    ``what`` the two means in words."""
    figure: str
    what: str
    outcome: str


def compare(a: List[float], b: List[float]) -> str:
    """'higher' or 'lower' when a's mean differs from b's by more than the seed spread
    (the sum of the two sds, ddof=1); else 'within the seed spread'; 'undecided' with
    fewer than two values on a side."""
    if len(a) < 2 or len(b) < 2:
        return 'undecided'
    difference = statistics.mean(a) - statistics.mean(b)
    if abs(difference) <= statistics.stdev(a) + statistics.stdev(b):
        return 'within the seed spread'
    return 'higher' if difference > 0 else 'lower'


def claim_verdict(comparisons: List[Comparison], supports: Dict[str, str]) -> str:
    """One verdict over comparisons, ``supports``: figure → the outcome that supports
    the claim ('higher' or 'lower')."""
    outcomes = [('for' if c.outcome == supports[c.figure] else 'against')
                if c.outcome in ('higher', 'lower') else c.outcome for c in comparisons]
    if all(o == 'undecided' for o in outcomes):
        return 'cannot tell (one seed: no spread to judge a difference by)'
    if 'for' in outcomes and 'against' in outcomes:
        return 'mixed'
    if 'for' in outcomes:
        return 'supported'
    if 'against' in outcomes:
        return 'contradicted'
    return 'not shown (every difference within the seed spread)'


# (key, the paper's words, the arms compared (a against b), figure → outcome for it)
CLAIMS = (
    ('a', 'hard constraints "increase overall model performance"',
     [('hard', 'control'), ('hard', 'soft')], {'AP': 'higher'}),
    ('b', 'soft constraints "handle expert utilization better"',
     [('soft', 'hard')], {'living_experts': 'higher', 'importance_cv': 'lower'}),
    ('c', 'soft constraints "support the expert specialization process"',
     [('soft', 'hard')], {'nmi': 'higher', 'nmi_given_level': 'higher'}),
)


def arms_of(figures: Dict[str, List[dict]], group: str) -> Dict[Optional[str], str]:
    """expert init → arm name, of the arms of ``group`` ('control' or a constraint)."""
    return {arm.init: arm.name for arm in ARMS if arm.name in figures
            and (arm.name == group or arm.name.startswith(f'{group}-'))}


def claim_sentences(figures: Dict[str, List[dict]]) -> List[str]:
    """One sentence per paper claim, computed from the arms' per-seed figures: the
    toy's verdict and every comparison it rests on (hard against soft at the same
    expert initialisation; against the control at every one)."""
    sentences = []
    for key, words, pairs, supports in CLAIMS:
        comparisons = []
        for a_group, b_group in pairs:
            a_arms, b_arms = arms_of(figures, a_group), arms_of(figures, b_group)
            for init, a_name in a_arms.items():
                b_name = b_arms.get(None if b_group == 'control' else init)
                for figure in supports if b_name else ():
                    a, b = values(figures[a_name], figure), values(figures[b_name], figure)
                    outcome = compare(a, b)
                    comparisons.append(Comparison(
                        figure, f'{figure}: {a_name} {fmt_mean(a)} vs {b_name} {fmt_mean(b)}',
                        outcome))
        details = '; '.join(f'{c.what} ({c.outcome})' for c in comparisons)
        sentences.append(f'({key}) {words}: {claim_verdict(comparisons, supports)} on the '
                         f'toy — {details or "no arms to compare"}.')
    return sentences


def fmt_mean(found: List[float]) -> str:
    return f'{statistics.mean(found):.3f}' if found else 'n/a'


def report_text(figures: Dict[str, List[dict]], labels: Dict[str, str],
                seeds: Sequence[int], dense_checkpoint: str) -> str:
    return '\n'.join([
        "# The paper's protocol on the toy (`make demo-paper`)", '',
        f'Every arm fine-tuned from the dense checkpoint {dense_checkpoint}, all but the '
        'classification branch frozen; mean ± sd over seeds '
        f'{", ".join(map(str, seeds))} (sd with ddof=1; NMI intervals: the seeds\' mean '
        '95 % bootstrap bounds; wall time: fine-tuning and evaluation).', '',
        protocol_table(figures, labels), '',
        "The paper's claims (a difference counts only where the means differ by more "
        'than the sum of the two seed sds):', '',
        *[f'- {sentence}' for sentence in claim_sentences(figures)], ''])


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        dense = find_dense_checkpoint(args)
        if dense:
            check_dense_checkpoint(dense)
    except PaperDemoError as err:
        print(f'demo_paper: error: {err}', file=sys.stderr)
        return 2
    prepare_dataset(args)
    if dense is None:
        dense_run = Run(args, 'dense', DENSE_CONFIG, VARIANTS['dense'][1], 0)
        dense_run.train_and_evaluate(args)
        dense = last_checkpoint(dense_run.work_dir)
    print(f'==> [demo-paper] fine-tuning every arm from {dense}', flush=True)
    fresh = write_without_branch(dense, osp.join(args.work_dir, 'dense_without_cls_branch.pth'))
    seeds = range(args.seeds)
    runs = [PaperRun(args, arm, seed, fresh if arm.init == 'fresh' else dense)
            for seed in seeds for arm in ARMS]
    for r in runs:
        r.train_and_evaluate(args)
    import mmdet_moe  # noqa: F401  (registers the modules the summaries name)
    figures = {arm.name: [r.figures() for r in runs if r.arm == arm] for arm in ARMS}
    text = report_text(figures, {arm.name: arm.label for arm in ARMS}, seeds, dense)
    publish(text, osp.join(args.work_dir, REPORT), start)
    return 0


if __name__ == '__main__':
    sys.exit(main())
