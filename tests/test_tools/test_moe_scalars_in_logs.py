"""The MoE scalars in mmengine's JSON log (what TensorBoard gets too) and in mmdet's
tools/analysis_tools/analyze_logs.py: train and val apart, nothing else broken."""
import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import TOY_MOE_CONFIG, as_cli_options, make_tiny_coco, run_tool, toy_overrides

from mmdet_moe.stock_tools import stock_tool_path

pytestmark = pytest.mark.slow

LAYER = 'bbox_head.cls_moe'


@pytest.fixture(scope='module')
def json_log(tmp_path_factory):
    """Two epochs of the toy MoE RetinaNet, both MoE hooks on, validated each epoch."""
    root = tmp_path_factory.mktemp('scalars')
    data = make_tiny_coco(root / 'data', train=4, val=2)
    options = toy_overrides(data, max_epochs=2)
    options.update({'train_cfg.val_interval': 1, 'custom_hooks.1.interval': 1,
                    'custom_hooks.0.score_thr': 0.0, 'model.test_cfg.score_thr': 0.0})
    proc = run_tool('train.py', TOY_MOE_CONFIG, '--work-dir', root / 'work',
                    *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
    (path,) = glob.glob(str(root / 'work' / '*' / 'vis_data' / 'scalars.json'))
    return path


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_and_val_scalars_have_distinct_names(json_log):
    train = [line for line in lines(json_log) if 'loss' in line]
    val = [line for line in lines(json_log) if 'loss' not in line]
    assert len(train) == 4 and len(val) == 2
    train_moe = {k for line in train for k in line if 'moe_train' in k}
    val_moe = {k for line in val for k in line if 'moe_val' in k}
    assert {f'moe_train.{LAYER}.share_e{i}' for i in range(4)} <= train_moe
    assert f'moe_train.{LAYER}.living_experts' in train_moe
    assert {f'moe_val/{LAYER}.{key}' for key in ('nmi', 'nmi_given_level',
                                                 'nmi_rel_scale_given_level', 'living_experts',
                                                 'importance_cv')} <= val_moe
    # TensorBoard groups tags by their first '/' component: train MoE tags have none,
    # val MoE tags fall in 'moe_val'; no tag is shared by train and val
    assert not any('/' in k for k in train_moe)
    keys_train = {k for line in train for k in line} - {'step'}
    keys_val = {k for line in val for k in line} - {'step', 'time', 'data_time'}
    assert not keys_train & keys_val
    # mmdet's analyze_logs reads a line's keys up to the first one with a '/' as
    # training keys: a train line must keep epoch, iter and step
    assert all({'epoch', 'iter', 'step'} <= set(line) for line in train)


def analyze_logs(*args, tmp_path):
    env = dict(os.environ, MPLBACKEND='Agg')
    proc = subprocess.run([sys.executable, stock_tool_path('analysis_tools/analyze_logs.py'),
                           *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    return proc


@pytest.mark.parametrize('keys', [
    ['loss', 'loss_moe_importance'],
    [f'moe_train.{LAYER}.share_e0', f'moe_train.{LAYER}.living_experts'],
])
def test_analyze_logs_plots_train_curves(json_log, tmp_path, keys):
    out = tmp_path / 'curve.png'
    proc = analyze_logs('plot_curve', json_log, '--keys', *keys, '--out', out,
                        tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0
    assert all(f'metric is {key}' in proc.stdout for key in keys)


def test_analyze_logs_reads_val_moe_scalars_per_layer(json_log):
    """analyze_logs keys a val scalar by its name after the last '/': the layer stays
    in it, so two layers' NMIs do not land in one list."""
    sys.path.insert(0, os.path.dirname(stock_tool_path('analysis_tools/analyze_logs.py')))
    try:
        from analyze_logs import load_json_logs
    finally:
        sys.path.pop(0)
    (log,) = load_json_logs([json_log])
    assert [len(log[epoch][f'{LAYER}.nmi']) for epoch in (1, 2)] == [1, 1]
    # every train line keeps its step, no val line adds one (analyze_logs moves to the
    # next epoch after the first line that names it)
    assert log[1]['step'] + log[2]['step'] == [1, 2, 3, 4]


def test_cal_train_time(json_log, tmp_path):
    proc = analyze_logs('cal_train_time', json_log, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'average iter time' in proc.stdout
