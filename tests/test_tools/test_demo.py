"""A shortened demo runs the README's main job through the same code path."""
import csv
import json
import os.path as osp

import pytest

from helpers import TOY_BASE_CONFIG, TOY_MOE_CONFIG, as_cli_options, run_tool, toy_overrides


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    proc = run_tool('demo.py', '--data-root', root / 'data', '--work-dir', root / 'work',
                    '--train-images', 8, '--val-images', 4, '--image-size', 96,
                    '--epochs', 2, '--tiny')
    assert proc.returncode == 0, proc.output[-3000:]
    return root, proc.output


def test_demo_writes_checkpoint_stats_and_report(demo):
    root, output = demo
    work = root / 'work'
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
    # training logged expert utilisation and the balance loss
    assert 'loss_moe_importance' in output and 'share_e0' in output


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
    with open(root / 'work' / 'last_checkpoint') as f:
        moe_checkpoint = f.read().strip()
    proc = run_tool('analyze_experts.py', TOY_BASE_CONFIG, moe_checkpoint, '--out-dir',
                    tmp_path / 'r', '--work-dir', tmp_path / 'w',
                    *as_cli_options(toy_overrides(root / 'data')))
    assert proc.returncode == 2 and 'does not match the config' in proc.stderr
    assert not (tmp_path / 'r').exists()


def test_per_expert_evaluation_and_drawing(demo, tmp_path):
    root, _ = demo
    with open(root / 'work' / 'last_checkpoint') as f:
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
