"""`make demo-routing`: routing granularities trained alike, one table."""
import os.path as osp

import pytest

from helpers import import_tool, make_tiny_coco, run_tool


@pytest.fixture(scope='module')
def routing():
    return import_tool('demo_routing')


def test_every_arm_has_its_config(routing):
    assert [arm.name for arm in routing.ARMS] == [
        'image', 'location-subnet', 'location-conv', 'mumoe-pixel', 'scale-supervised',
        'roi', 'moe-fpn']
    for arm in routing.ARMS:
        assert osp.isfile(arm.config), arm


@pytest.mark.parametrize('args, message', [
    (['--seeds', '0'], '--seeds must be >= 1, got 0'),
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['--arms', 'pixel'], "invalid choice: 'pixel'"),
])
def test_bad_arguments_are_named(routing, capsys, args, message):
    with pytest.raises(SystemExit):
        routing.parse_args(args)
    assert message in capsys.readouterr().err


def seed(nmi, given_level, rel_scale, ap=0.3, verdict='by level', scale='not by scale'):
    """One seed's figures of a layer: each NMI as (value, lower, upper, baseline), the
    report's verdicts."""
    figures = dict(AP=ap, AP_S=0.2, AP_M=0.3, AP_L=0.4, active=1000, seconds_per_iter=0.5,
                   verdict=verdict, rel_scale_verdict=scale)
    for key, quad in (('nmi', nmi), ('nmi_given_level', given_level),
                      ('nmi_rel_scale', rel_scale)):
        value, lower, upper, baseline = quad
        figures.update({key: value, f'{key}_lower': lower, f'{key}_upper': upper,
                        f'{key}_baseline': baseline})
    return figures


def test_the_table_and_sentences_from_given_numbers(routing):
    level_only = seed((0.4, 0.35, 0.45, 0.01), (0.001, 0.0, 0.003, 0.002),
                      (0.01, 0.005, 0.02, 0.01))
    by_scale = [seed((0.5, 0.45, 0.55, 0.01), (0.1, 0.08, 0.12, 0.002),
                     (0.3, 0.25, 0.35, 0.01), ap=ap, verdict='within levels', scale=scale)
                for ap, scale in ((0.30, 'by scale'), (0.32, 'weakly'))]
    untagged = dict(level_only, nmi=None, nmi_lower=None, nmi_upper=None,
                    nmi_baseline=None)
    figures = {'image': {'bbox_head.cls_moe': [level_only]},
               'scale-supervised': {'bbox_head.cls_convs.1.conv': by_scale},
               'moe-fpn': {'neck.fpn_convs.0.conv': [untagged]}}
    labels = {'image': 'per image', 'scale-supervised': 'supervised',
              'moe-fpn': 'neck'}
    text = routing.report_text(figures, labels, [0, 1])
    rows = [line for line in text.splitlines() if line.startswith('| ')]
    assert len(rows) == 4 and all(row.count(' | ') == len(routing.HEADERS) - 1 for row in rows)
    supervised = rows[2]
    assert '0.310 ± 0.014' in supervised  # AP over the two seeds
    assert '0.300 ± 0.000 [0.250, 0.350] (baseline 0.010)' in supervised
    assert '| 1,000 |' in supervised  # active parameters, the same at every seed
    assert '| – |' in rows[3]
    # the layer reports' verdicts, each seed's where they differ
    assert '- per image, bbox_head.cls_moe: by level; not by scale.' in text
    assert '- supervised, bbox_head.cls_convs.1.conv: within levels; seed 0: by scale / ' \
           'seed 1: weakly.' in text
    assert 'neck, neck.fpn_convs.0.conv: no detection reached' in text


def test_report_only_without_runs_names_the_missing_statistics(routing, tmp_path, capsys):
    code = routing.main(['--report-only', '--work-dir', str(tmp_path / 'w'),
                         '--arms', 'roi'])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / 'w' / 'roi_seed0') in err and 'leave out' in err
    assert not (tmp_path / 'w').exists()


def test_demo_routing_flag_dispatches_with_its_options(routing, tmp_path, capsys):
    demo = import_tool('demo')
    with pytest.raises(SystemExit):
        demo.main(['--routing', '--seeds', '0'])
    assert '--seeds must be >= 1, got 0' in capsys.readouterr().err


@pytest.mark.slow
def test_demo_routing_end_to_end(tmp_path):
    """Two arms on a tiny dataset: the scale-supervised per-location conv MoE and the
    per-RoI Faster R-CNN, a row of figures per MoE layer."""
    data = make_tiny_coco(tmp_path / 'data', train=8, val=4, size=96)
    work = tmp_path / 'work'
    proc = run_tool('demo.py', '--routing', '--data-root', data, '--work-dir', work,
                    '--train-images', 8, '--val-images', 4, '--image-size', 96,
                    '--epochs', 1, '--arms', 'scale-supervised', 'roi',
                    '--tiny', timeout=1800)
    assert proc.returncode == 0, proc.output[-3000:]
    report = (work / 'routing.md').read_text()
    rows = [line for line in report.splitlines() if line.startswith('| ')][1:]
    layers = [row.split('|')[2].strip() for row in rows]
    assert layers == ['`bbox_head.cls_convs.0.conv`',
                      '`roi_head.bbox_head.shared_convs.2.conv`',
                      '`roi_head.bbox_head.shared_convs.3.conv`'], report
    assert sum(line.startswith('- ') for line in report.splitlines()) == len(rows)
    assert report.strip() in proc.output
