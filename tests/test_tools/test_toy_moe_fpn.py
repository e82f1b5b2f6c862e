"""The toy MoE-FPN RetinaNet (stock head) through the stock tools: trained and
validated by tools/train.py, its statistics have per-detection tables and the
level-controlled view for every neck conv, tools/analyze_experts.py reports them
and tools/draw_expert_detections.py colours boxes by a neck conv's experts."""
import json
import os.path as osp
import re

import numpy as np
import pytest
from helpers import CONFIGS, as_cli_options, make_tiny_coco, run_tool, toy_overrides

pytestmark = pytest.mark.slow

CONFIG = osp.join(CONFIGS, 'toy', 'retinanet_r18_moe-fpn_4e_toy-coco.py')
# the toy FPN: laterals of P3-P5, output convs of P3-P5, extra convs of P6 and P7
FEEDS = {**{f'neck.lateral_convs.{i}.conv': i for i in range(3)},
         **{f'neck.fpn_convs.{i}.conv': i for i in range(5)}}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One epoch (2 iterations), validated with every detection counted (score 0)."""
    data = make_tiny_coco(tmp_path_factory.mktemp('toy_moe_fpn') / 'data', size=256)
    work_dir = tmp_path_factory.mktemp('moe_fpn') / 'work'
    options = toy_overrides(data)
    options.update({'model.test_cfg.score_thr': 0.0, 'custom_hooks.0.score_thr': 0.0,
                    'custom_hooks.1.interval': 1})
    proc = run_tool('train.py', CONFIG, '--work-dir', work_dir, *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
    with open(work_dir / 'expert_size_stats.json') as f:
        stats = json.load(f)
    return dict(work_dir=work_dir, stats=stats, output=proc.output, data=data)


def test_every_neck_conv_has_detection_and_level_tables(run):
    stats = run['stats']
    assert stats['num_detections'] > 0 and sorted(stats['layers']) == sorted(FEEDS)
    counted = 0
    for name, layer in stats['layers'].items():
        assert layer['detection_gates'] == 'tagged', name
        per_level = np.array(layer['detection_levels']['mass'])  # expert × size × level
        # the conv counts only detections of its own level, each with a row summing to 1
        outside = np.delete(per_level.sum((0, 1)), FEEDS[name]) if \
            FEEDS[name] < per_level.shape[2] else per_level.sum((0, 1))
        assert np.allclose(outside, 0), name
        assert np.sum(layer['detection']['mass']) == pytest.approx(layer['num_detections'],
                                                                  rel=1e-4)
        assert layer['nmi_given_level'] is not None
        assert (layer['intervals'] is not None) == (layer['num_detections'] > 0), name
        counted += layer['num_detections'] if 'fpn_convs' in name else 0
    # every detection comes from one level, computed by one output or extra conv
    assert counted == stats['num_detections']
    assert 'loss_moe_importance' in run['output']
    assert 'moe_val/neck.fpn_convs.0.conv.nmi_given_level:' in run['output']


def test_analyze_experts_reports_the_level_controlled_view(run, tmp_path):
    proc = run_tool('analyze_experts.py', run['work_dir'] / 'expert_size_stats.json',
                    '--out-dir', tmp_path / 'report')
    assert proc.returncode == 0, proc.output[-3000:]
    fed = [n for n, layer in run['stats']['layers'].items() if layer['num_detections']]
    assert len(re.findall(r'NMI expert↔size \| FPN level \d', proc.stdout)) >= len(fed) > 0


def test_draw_colours_a_neck_convs_detections(run, tmp_path):
    checkpoint = run['work_dir'] / 'epoch_1.pth'
    proc = run_tool('draw_expert_detections.py', CONFIG, checkpoint, '--out-dir',
                    tmp_path / 'vis', '--num-images', 2, '--score-thr', 0,
                    # expert_layers follow the neck's module order, as FEEDS
                    '--moe-index', list(FEEDS).index('neck.fpn_convs.0.conv'),
                    *as_cli_options(toy_overrides(run['data'])))
    assert proc.returncode == 0, proc.output[-3000:]
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 2


def test_tta_keeps_each_detections_neck_tags(run, tmp_path):
    """tools/test.py --tta (MoEDetTTAModel): each view is tagged by its own forward,
    and the merged detections keep their view's neck columns."""
    options = dict(toy_overrides(run['data']), **{'model.test_cfg.score_thr': 0.0,
                                                  'custom_hooks.0.score_thr': 0.0})
    proc = run_tool('test.py', CONFIG, run['work_dir'] / 'epoch_1.pth', '--tta',
                    '--work-dir', tmp_path, *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
    stats = json.loads((tmp_path / 'expert_size_stats.json').read_text())
    assert stats['num_detections'] > 0
    assert all(layer['detection_gates'] == 'tagged' for layer in stats['layers'].values())
    assert sum(layer['num_detections'] for name, layer in stats['layers'].items()
               if 'fpn_convs' in name) == stats['num_detections']
