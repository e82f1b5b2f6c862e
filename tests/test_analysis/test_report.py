"""The report renders known statistics into the expected tables, CSVs and images."""
import copy
import csv

import numpy as np
import pytest

from mmdet_moe.analysis import ReportError, render_report


def known_stats():
    return dict(
        schema='mmdet_moe/expert_size_stats', version=1, mode='test', epoch=3, iter=30,
        size_buckets=dict(names=['small', 'medium', 'large'],
                          area_ranges=[[0, 1024], [1024, 9216], [9216, 1e10]]),
        classes=['a', 'b'], score_thr=0.3, match_gt=False, iou_thr=0.5, num_images=4,
        num_detections=10, gt_per_bucket=[5, 3, 2],
        layers={'bbox_head.cls_moe': dict(
            num_experts=2,
            detection=dict(mass=[[6.0, 2.0, 0.0], [0.0, 0.0, 2.0]],
                           count=[[7, 3, 0], [0, 1, 2]]),
            classes=dict(mass=[[4.0, 4.0], [0.0, 2.0]], count=[[5, 5], [0, 3]]),
            image=dict(mass=[[3.0, 1.0, 1.0], [2.0, 2.0, 1.0]]),
            levels=dict(mass=[[3.0, 1.0], [1.0, 3.0]], rows=4),
            importance=[4.0, 4.0], rows=8,
            nmi_shuffled=dict(mean=0.01, std=0.005, permutations=20))})


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_report_files_and_numbers(tmp_path):
    out = tmp_path / 'report'
    forced = [dict(routing='learned', AP=0.5, AP_S=0.4, AP_M=0.5, AP_L=0.6)]
    render_report(known_stats(), str(out), forced)
    names = {p.name for p in out.iterdir()}
    stem = 'bbox_head.cls_moe'
    assert {'report.md', 'summary.csv', 'forced_routing.csv', f'{stem}_size_given_expert.csv',
            f'{stem}_expert_given_size.csv', f'{stem}_levels.csv', f'{stem}_classes.csv',
            f'{stem}_expert_size.png', f'{stem}_expert_level.png'} <= names
    given_expert = read_csv(out / f'{stem}_size_given_expert.csv')
    assert [float(v) for v in given_expert[1][1:4]] == [0.75, 0.25, 0.0]
    assert given_expert[1][4] == 'small' and given_expert[2][4] == 'large'
    assert given_expert[1][6] == '10'  # detections routed to expert 0
    given_size = read_csv(out / f'{stem}_expert_given_size.csv')
    assert [float(v) for v in given_size[1][1:]] == [1.0, 1.0, 0.0]
    levels = read_csv(out / f'{stem}_levels.csv')
    assert [float(v) for v in levels[1][1:]] == [0.75, 0.25]
    # NMI of [[6, 2, 0], [0, 0, 2]] computed independently
    joint = np.array([[6, 2, 0], [0, 0, 2]]) / 10
    h = lambda p: -sum(x * np.log(x) for x in p.ravel() if x > 0)  # noqa: E731
    nmi = (h(joint.sum(0)) + h(joint.sum(1)) - h(joint)) / h(joint.sum(0))
    summary = read_csv(out / 'summary.csv')
    assert float(summary[1][4]) == pytest.approx(nmi)
    assert summary[1][2] == '2'  # living experts
    text = (out / 'report.md').read_text()
    assert f'{nmi:.4f}' in text and 'Forced routing' in text
    assert 'P(small \\| expert)' in text  # pipes escaped in markdown tables


@pytest.mark.parametrize('change, match', [
    (dict(schema='other'), 'not an expert size statistics file'),
    (dict(version=4), 'version 4 is not supported'),
    (dict(layers={}), 'no MoE layer'),
    (dict(num_images=0), 'empty dataset'),
])
def test_bad_statistics_leave_no_report(tmp_path, change, match):
    stats = dict(copy.deepcopy(known_stats()), **change)
    out = tmp_path / 'report'
    with pytest.raises(ReportError, match=match):
        render_report(stats, str(out))
    assert list(tmp_path.iterdir()) == []


def test_no_detection_falls_back_to_the_image_view(tmp_path):
    stats = known_stats()
    stats['num_detections'] = 0
    layer = stats['layers']['bbox_head.cls_moe']
    layer['detection'] = dict(mass=[[0, 0, 0], [0, 0, 0]], count=[[0, 0, 0], [0, 0, 0]])
    layer['classes'] = dict(mass=[[0, 0], [0, 0]], count=[[0, 0], [0, 0]])
    render_report(stats, str(tmp_path / 'r'))
    text = (tmp_path / 'r' / 'report.md').read_text()
    assert 'image (no detection above threshold)' in text
    # the image-view NMI is never set beside the detection view's shuffled baseline
    assert 'shuffled' not in text.split('## bbox_head.cls_moe')[1], text
    assert 'no detection-view baseline' in text
    summary = read_csv(tmp_path / 'r' / 'summary.csv')
    assert summary[0][5] == 'NMI shuffled' and summary[1][5] == ''


def test_level_controlled_view_in_the_report(tmp_path):
    """Version-2 statistics: the level-conditioned NMI with baselines and intervals,
    the verdict, and per-level tables (Markdown, CSV, one heatmap grid)."""
    stats = known_stats()
    stats['version'] = 2
    layer = stats['layers']['bbox_head.cls_moe']
    table = np.zeros((2, 3, 2))
    table[0, :2, 0] = [6.0, 2.0]    # P3: expert 0, small and medium
    table[1, 2, 1] = 2.0            # P4: expert 1, large
    layer.update(detection_levels=dict(mass=table.tolist()),
                 nmi_shuffled=dict(mean=0.01, std=0.005, permutations=20,
                                   interval=[0.0, 0.02]),
                 nmi_given_level_shuffled=dict(mean=0.0, std=0.0, permutations=20,
                                               interval=[0.0, 0.0]),
                 intervals=dict(nmi=[0.5, 0.9], nmi_given_level=[0.0, 0.0],
                                p_size_given_expert=[[[0, 1]] * 3] * 2))
    out = tmp_path / 'report'
    render_report(stats, str(out))
    text = (out / 'report.md').read_text()
    assert 'NMI expert↔size | FPN level 0.0000' in text
    assert '[95 % CI 0.5000, 0.9000]' in text
    assert 'goes through the FPN level' in text
    assert 'expert 0: P(size | expert) small 0.750 [0.000, 1.000]' in text
    rows = read_csv(out / 'bbox_head.cls_moe_size_expert_given_level.csv')
    assert rows[1][:5] == ['P3', 'expert 0', '0.75', '0.25', '0.0']
    assert (out / 'bbox_head.cls_moe_size_given_expert_level.png').exists()


def many_experts_stats(num_experts=256, seed=0):
    """Version-2 statistics of a μMoE-like layer: every expert prefers one size."""
    rng = np.random.RandomState(seed)
    stats = known_stats()
    stats['version'] = 2
    favourite = rng.randint(0, 3, num_experts)
    mass = rng.rand(num_experts, 3) * 0.2
    mass[np.arange(num_experts), favourite] += 1
    levels = np.repeat(mass[:, :, None], 5, axis=2) / 5
    stats['layers'] = {'bbox_head.cls_convs.3.conv': dict(
        num_experts=num_experts,
        detection=dict(mass=mass.tolist(), count=(mass > 0).astype(float).tolist()),
        classes=dict(mass=np.ones((num_experts, 2)).tolist(),
                     count=np.ones((num_experts, 2)).tolist()),
        image=dict(mass=mass.tolist()),
        levels=dict(mass=np.ones((num_experts, 5)).tolist(), rows=4),
        importance=mass.sum(1).tolist(), rows=20,
        detection_levels=dict(mass=levels.tolist()),
        nmi_shuffled=dict(mean=0.01, std=0.005, permutations=20))}
    return stats, favourite


def test_report_stays_readable_with_hundreds_of_experts(tmp_path):
    """N = 256: experts grouped by their dominant size in the Markdown (no table or
    list with a row per expert); every expert stays in the CSVs."""
    stats, favourite = many_experts_stats()
    out = tmp_path / 'report'
    render_report(stats, str(out))
    text = (out / 'report.md').read_text()
    assert len(text.splitlines()) < 150
    assert 'expert 200' not in text.replace('expert 200 ', '')  # not listed one by one
    counts = np.bincount(favourite, minlength=3)
    for size, count in zip(('small', 'medium', 'large'), counts):
        assert f'| {size} | {count} |' in text
    rows = read_csv(out / 'bbox_head.cls_convs.3.conv_size_given_expert.csv')
    assert len(rows) == 1 + 256
    summary = read_csv(out / 'summary.csv')
    assert f'small {counts[0]}, medium {counts[1]}, large {counts[2]}' in summary[1]


def test_active_compute_section(tmp_path):
    rows = [dict(layer='neck.conv', kind='MoEConv2d (fused)', N=4, k=2, rows_per_image=1.0,
                 params_total=2408, params_active=1240, flops_k=1_500_000.0,
                 flops_n=6_000_000.0),
            dict(layer='model', kind='whole model', N=None, k=None, rows_per_image=None,
                 params_total=12_000_000, params_active=11_000_000, flops_k=2.91e9,
                 flops_n=3.2e9)]
    render_report(known_stats(), str(tmp_path / 'r'),
                  active_compute=dict(input_shape=(32, 48), rows=rows))
    text = (tmp_path / 'r' / 'report.md').read_text()
    assert 'of a 32×48 image' in text
    assert '| model | whole model | – | – | – | 12.000 M | 11.000 M | 2.910 G | 3.200 G |' \
        in text
    table = read_csv(tmp_path / 'r' / 'active_compute.csv')
    assert table[0][-1] == 'FLOPs / image at N' and table[1][-1] == '6000000.0'
    render_report(known_stats(), str(tmp_path / 'json'))  # from a statistics file
    assert 'Not measured: this report was made from a statistics file' in \
        (tmp_path / 'json' / 'report.md').read_text()
    assert not (tmp_path / 'json' / 'active_compute.csv').exists()
