"""A shortened demo runs the README's main job through the same code path."""
import csv
import json
import os.path as osp
import re

import pytest

from helpers import (TOOLS, TOY_BASE_CONFIG, TOY_MOE_CONFIG, as_cli_options, load_tool,
                     run_tool, toy_overrides)

TINY = ('--train-images', 8, '--val-images', 4, '--image-size', 96, '--epochs', 2, '--tiny')


def run_demo(root, *args):
    proc = run_tool('demo.py', '--data-root', root / 'data', '--work-dir', root / 'work',
                    *TINY, *args)
    assert proc.returncode == 0, proc.output[-3000:]
    return proc.output


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    return root, run_demo(root)


def headline(work):
    """A run's AP (where it detected anything) and specialisation figures to 3
    decimals, and its experts' gate mass on the val set to 6."""
    from mmdet_moe.analysis import BUCKET_NAMES, layer_summary
    with open(work / 'analyze' / 'expert_size_stats.json') as f:
        stats = json.load(f)
    layer = stats['layers']['bbox_head.cls_moe']
    summary = layer_summary(layer, BUCKET_NAMES)
    figures = dict(stats['metrics'], nmi=summary['nmi'],
                   nmi_given_level=summary['nmi_given_level'])
    return ({key: round(value, 3) for key, value in figures.items()
             if isinstance(value, float)}, [round(v, 6) for v in layer['importance']])


@pytest.mark.slow
def test_demo_writes_checkpoint_stats_and_report(demo):
    root, output = demo
    work = root / 'work' / 'moe-soft_seed0'
    with open(work / 'last_checkpoint') as f:
        assert osp.isfile(f.read().strip())
    with open(work / 'analyze' / 'expert_size_stats.json') as f:
        stats = json.load(f)
    assert stats['schema'] == 'mmdet_moe/expert_size_stats' and stats['num_images'] == 4
    layer = stats['layers']['bbox_head.cls_moe']
    assert layer['num_experts'] == 4 and layer['rows'] == 4 * 5  # images × FPN levels
    assert sum(layer['importance']) == pytest.approx(20.0, rel=1e-4)  # rows sum to 1
    report = work / 'report'
    for name in ('report.md', 'summary.csv', 'metrics.json',
                 'bbox_head.cls_moe_expert_size.png', 'bbox_head.cls_moe_expert_level.png'):
        assert (report / name).is_file(), name
    with open(report / 'summary.csv') as f:
        rows = list(csv.reader(f))
    assert rows[1][0] == 'bbox_head.cls_moe' and 0 <= float(rows[1][4]) <= 1
    assert 'mmdet-moe demo: summary' in output and 'report:' in output
    # the dataset's fingerprint, as make_toy_coco.py computes it (not the default
    # dataset: no word about the README's)
    fingerprint = load_tool('make_toy_coco.py').dataset_fingerprint(root / 'data')
    line = f"toy dataset {root / 'data'}: fingerprint {fingerprint}\n"
    assert output.count(line) == 2, output[-3000:]  # at the start and in the summary
    # training logged expert utilisation and the balance loss
    assert 'loss_moe_importance' in output and 'share_e0' in output
    # the summary gives the AP with the routing forced to each expert and to all
    for routing in ['learned', *(f'expert {e} alone' for e in range(4)),
                    'all experts, equal weights (no gate)']:
        assert re.search(rf'  {re.escape(routing)} +AP ', output), routing


@pytest.mark.slow
def test_same_seed_same_numbers_and_the_side_by_side_table(demo, tmp_path):
    """A second run with the same seed, here with --compare, repeats the first
    run's AP and specialisation figures; the table lists the three detectors."""
    root, _ = demo
    (tmp_path / 'data').symlink_to(root / 'data')
    output = run_demo(tmp_path, '--compare', '--no-per-expert')
    first, again = headline(root / 'work' / 'moe-soft_seed0'), \
        headline(tmp_path / 'work' / 'moe-soft_seed0')
    assert first == again and 'nmi' in first[0]
    table = (tmp_path / 'work' / 'comparison.md').read_text().splitlines()
    assert table[0].split('|')[1:-1] == [
        ' detector ', ' AP ', ' AP_S ', ' AP_M ', ' AP_L ', ' params total ',
        ' params active / image ', ' s / iter ']
    labels = [row.split('|')[1].strip() for row in table[2:]]
    assert labels == ['dense RetinaNet', 'MoE soft (importance loss)',
                      'MoE hard (relative importance)']
    cells = {label: row.split('|')[2:-1] for label, row in zip(labels, table[2:])}
    for label, row in cells.items():
        total, active = (int(c.replace(',', '')) for c in row[4:6])
        assert active <= total and float(row[6]) > 0, label
    dense_total = int(cells['dense RetinaNet'][4].replace(',', ''))
    assert int(cells['MoE soft (importance loss)'][5].replace(',', '')) > dense_total
    assert '\n'.join(table) in output


@pytest.mark.slow
def test_seeds_give_mean_and_sd(tmp_path, demo):
    root, _ = demo
    (tmp_path / 'data').symlink_to(root / 'data')
    output = run_demo(tmp_path, '--seeds', 2, '--epochs', 1, '--no-per-expert')
    assert (tmp_path / 'work' / 'moe-soft_seed1' / 'report' / 'report.md').is_file()
    # (the tiny runs may detect nothing: COCO then gives no AP to average)
    assert re.search(r'MoE soft \(importance loss\) +AP ([0-9.]+ ± [0-9.]+|n/a \(0 run)',
                     output)
    stability = (tmp_path / 'work' / 'moe-soft_seeds' / 'seed_stability.md').read_text()
    assert 'bbox_head.cls_moe' in stability and 'nmi' in stability


@pytest.mark.slow
def test_analyze_experts_errors_are_clear(demo, tmp_path):
    root, _ = demo
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(dict(schema='mmdet_moe/expert_size_stats', version=9)))
    proc = run_tool('analyze_experts.py', bad, '--out-dir', tmp_path / 'r')
    assert proc.returncode == 2 and 'version 9 is not supported' in proc.stderr
    assert not (tmp_path / 'r').exists()
    proc = run_tool('analyze_experts.py', TOY_MOE_CONFIG, tmp_path / 'none.pth',
                    '--out-dir', tmp_path / 'r')
    assert proc.returncode == 2 and 'checkpoint file not found' in proc.stderr
    # a dense checkpoint does not match the MoE config
    with open(root / 'work' / 'moe-soft_seed0' / 'last_checkpoint') as f:
        moe_checkpoint = f.read().strip()
    proc = run_tool('analyze_experts.py', TOY_BASE_CONFIG, moe_checkpoint, '--out-dir',
                    tmp_path / 'r', '--work-dir', tmp_path / 'w',
                    *as_cli_options(toy_overrides(root / 'data')))
    assert proc.returncode == 2 and 'does not match the config' in proc.stderr
    assert not (tmp_path / 'r').exists()


@pytest.mark.slow
def test_per_expert_evaluation_and_drawing(demo, tmp_path):
    root, _ = demo
    with open(root / 'work' / 'moe-soft_seed0' / 'last_checkpoint') as f:
        checkpoint = f.read().strip()
    options = as_cli_options(dict(toy_overrides(root / 'data'), **{
        'model.test_cfg.score_thr': 0.0}))
    proc = run_tool('analyze_experts.py', TOY_MOE_CONFIG, checkpoint, '--out-dir',
                    tmp_path / 'r', '--work-dir', tmp_path / 'w', '--per-expert',
                    '--k-sweep', '1', '--score-thr', '0', *options)
    assert proc.returncode == 0, proc.output[-3000:]
    with open(tmp_path / 'r' / 'metrics.json') as f:
        rows = json.load(f)
    assert [r['routing'] for r in rows] == ['learned'] + [f'expert {e} alone'
                                                          for e in range(4)] + [
        'all experts, equal weights (no gate)', 'top-1']
    proc = run_tool('draw_expert_detections.py', TOY_MOE_CONFIG, checkpoint, '--out-dir',
                    tmp_path / 'vis', '--num-images', 2, '--score-thr', 0, *options)
    assert proc.returncode == 0, proc.output[-3000:]
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 2


def test_mean_sd_of_ap_skips_what_coco_could_not_compute():
    import statistics
    import sys
    sys.path.insert(0, TOOLS)
    try:
        from demo import mean_sd
    finally:
        sys.path.remove(TOOLS)
    values = [0.30, 0.28, 0.33]
    assert mean_sd(values + [None, -1]) == \
        f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}'
    assert mean_sd([0.3, None]) == 'n/a (1 run(s) with a value)'


@pytest.fixture
def demo_module(monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)
    return load_tool('demo.py')


def test_check_names_each_figure_outside_the_readme_spread(demo_module, monkeypatch):
    spread, sds, min_ap = demo_module.README_SPREAD, demo_module.SPREAD_SDS, demo_module.MIN_AP
    inside = {key: mean for key, (mean, _) in spread.items()}
    inside['AP'] = max(inside['AP'], min_ap)
    mean, sd = spread['NMI']
    runs = {0: inside, 1: dict(inside, AP=min_ap - 0.01),
            2: dict(inside, NMI=mean + sds * sd + 1e-3)}
    monkeypatch.setattr(demo_module, 'headline', lambda run: runs[run.seed])
    failures = demo_module.check_failures(
        [type('Run', (), dict(seed=seed))() for seed in runs])
    seed1 = [f for f in failures if f.startswith('seed 1')]
    seed2 = [f for f in failures if f.startswith('seed 2')]
    assert len(failures) == len(seed1) + len(seed2), failures
    assert seed1[0].startswith(f'seed 1: AP {min_ap - 0.01:.3f} < {min_ap}')
    # an AP below MIN_AP is also outside the spread when the spread lies above it
    ap_low = spread['AP'][0] - sds * spread['AP'][1]
    assert len(seed1) == (2 if min_ap - 0.01 < ap_low else 1), seed1
    assert len(seed2) == 1 and seed2[0].startswith('seed 2: NMI') and 'outside' in seed2[0]
    assert f'{mean - sds * sd:.4f}, {mean + sds * sd:.4f}' in seed2[0]


@pytest.mark.parametrize('extra', [['--tiny'], ['--compare'], ['--epochs', '1'],
                                   ['--image-size', '128']])
def test_check_refuses_what_the_readme_figures_were_not_made_with(demo_module, capsys,
                                                                   extra):
    with pytest.raises(SystemExit):
        demo_module.parse_args(['--check', *extra])
    assert '--check compares with the README' in capsys.readouterr().err
