"""The toy MoE-anywhere configs through the stock tools: FCOS with MoE convs in its
head towers and Faster R-CNN with MoE convs in its RoI bbox head (per-RoI routing),
trained and validated by tools/train.py; validation writes expert_size_stats.json
with the detection view of every MoE layer, per FPN level, and
tools/analyze_experts.py reports on it."""
import json
import os.path as osp
import re

import numpy as np
import pytest
from helpers import CONFIGS, as_cli_options, make_tiny_coco, run_tool, toy_overrides

pytestmark = pytest.mark.slow

# config, the option that sets its detections' score threshold, its MoE layers
CASES = {
    'fcos': ('fcos_r18_fpn_moe-head_4e_toy-coco.py', 'model.test_cfg.score_thr',
             ['bbox_head.cls_convs.1.conv', 'bbox_head.reg_convs.1.conv']),
    'faster-rcnn': ('faster-rcnn_r18_fpn_moe-roi-head_4e_toy-coco.py',
                    'model.test_cfg.rcnn.score_thr',
                    ['roi_head.bbox_head.shared_convs.2.conv',
                     'roi_head.bbox_head.shared_convs.3.conv']),
}
NUM_EXPERTS, TOP_K = 4, 2


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # 256-px images as the toy set: the untrained models' boxes then fall in more
    # than one size bucket (the pipeline resizes every image to 256 px anyway)
    return make_tiny_coco(tmp_path_factory.mktemp('toy_moe_anywhere') / 'data', size=256)


@pytest.fixture(scope='module', params=sorted(CASES))
def run(request, data, tmp_path_factory):
    """One epoch (2 iterations), validated with every detection counted (score 0)."""
    config, score_thr, layers = CASES[request.param]
    work_dir = tmp_path_factory.mktemp(request.param) / 'work'
    options = toy_overrides(data)
    options.update({score_thr: 0.0, 'custom_hooks.0.score_thr': 0.0,
                    'custom_hooks.1.interval': 1})
    proc = run_tool('train.py', osp.join(CONFIGS, 'toy', config), '--work-dir', work_dir,
                    *as_cli_options(options))
    assert proc.returncode == 0, proc.output[-3000:]
    with open(work_dir / 'expert_size_stats.json') as f:
        stats = json.load(f)
    return dict(name=request.param, layers=layers, work_dir=work_dir, stats=stats,
                output=proc.output)


def test_training_logs_balance_loss_and_expert_shares(run):
    assert 'loss_moe_importance' in run['output']
    for layer in run['layers']:
        assert f'moe_train.{layer}.share_e0' in run['output']
        assert f'moe_val/{layer}.nmi:' in run['output']  # the detection view's NMI


def test_stats_have_a_detection_view_per_layer(run):
    stats = run['stats']
    num_dets = stats['num_detections']
    assert stats['mode'] == 'val' and stats['num_images'] == 2 and num_dets > 0
    assert sorted(stats['layers']) == sorted(run['layers']) and not stats['shared_routing']
    for name, layer in stats['layers'].items():
        assert layer['num_experts'] == NUM_EXPERTS
        mass = np.array(layer['detection']['mass'])  # expert × size bucket
        count = np.array(layer['detection']['count'])
        assert mass.shape == count.shape == (NUM_EXPERTS, 3), name
        # each detection's gate row (top-k softmax) sums to 1 and its box lies in one
        # size bucket: the mass is the number of detections, each counted by k experts
        assert mass.sum() == pytest.approx(num_dets, rel=1e-4), name
        assert count.sum() == TOP_K * num_dets, name
        classes = np.array(layer['classes']['mass'])
        assert classes.shape == (NUM_EXPERTS, 5) and classes.sum() == pytest.approx(num_dets,
                                                                                   rel=1e-4)


def test_stats_have_per_level_data(run):
    """FCOS tags each detection with its FPN level; Faster R-CNN with the level its
    RoI was pooled from: both give the level-controlled view."""
    stats = run['stats']
    for name, layer in stats['layers'].items():
        per_level = np.array(layer['detection_levels']['mass'])  # expert × size × level
        assert per_level.shape[:2] == (NUM_EXPERTS, 3), name
        np.testing.assert_allclose(per_level.sum(-1), layer['detection']['mass'], atol=1e-6)
        assert layer['nmi_given_level'] is not None and layer['intervals'] is not None
        if run['name'] == 'fcos':  # one gate call per FPN level: per-level gate rows
            level_rows = np.array(layer['levels']['mass'])
            assert level_rows.shape == (NUM_EXPERTS, 5) and layer['levels']['rows'] == 2
            assert per_level.shape[2] <= 5


def test_analyze_experts_reports_every_layer(run, tmp_path):
    out = tmp_path / 'report'
    proc = run_tool('analyze_experts.py', run['work_dir'] / 'expert_size_stats.json',
                    '--out-dir', out)
    assert proc.returncode == 0, proc.output[-3000:]
    for layer in run['layers']:
        assert layer in proc.stdout
    # per layer: the plain NMI and the level-conditioned one, each with a number
    assert len(re.findall(r'NMI expert↔size \d', proc.stdout)) == len(run['layers'])
    assert len(re.findall(r'NMI expert↔size \| FPN level \d', proc.stdout)) == \
        len(run['layers'])
    assert osp.isfile(out / 'report.md') and osp.isfile(out / 'summary.csv')
