"""tools/analyze_experts.py: seed stability over several statistics files, and the
equal-weight row of --per-expert, on hand-made statistics and a fake runner."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import load_tool, run_tool


@pytest.fixture(scope='module')
def tool():
    return load_tool('analyze_experts.py')


LAYER = 'bbox_head.cls_moe'


def stats_file(tmp_path, name, mass, importance=(4.0, 4.0), metrics=None, version=None):
    """An expert_size_stats.json with one 2-expert layer and the given expert × size
    detection mass; ``metrics`` as the evaluator returns them (None: an old file)."""
    from mmdet_moe.analysis import SCHEMA, SCHEMA_VERSION
    stats = dict(
        schema=SCHEMA, version=SCHEMA_VERSION if version is None else version,
        mode='test', epoch=3, iter=30,
        size_buckets=dict(names=['small', 'medium', 'large'],
                          area_ranges=[[0, 1024], [1024, 9216], [9216, 1e10]]),
        classes=['a', 'b'], score_thr=0.3, match_gt=False, iou_thr=0.5, num_images=4,
        num_detections=int(np.sum(mass)), gt_per_bucket=[5, 3, 2],
        layers={LAYER: dict(
            num_experts=2,
            detection=dict(mass=mass, count=[[int(v) for v in row] for row in mass]),
            classes=dict(mass=[[4.0, 4.0], [0.0, 2.0]], count=[[5, 5], [0, 3]]),
            image=dict(mass=[[3.0, 1.0, 1.0], [2.0, 2.0, 1.0]]),
            levels=dict(mass=[[3.0, 1.0], [1.0, 3.0]], rows=4),
            importance=list(importance), rows=8,
            nmi_shuffled=dict(mean=0.01, std=0.005, permutations=20))})
    if metrics is not None:
        stats['metrics'] = metrics
    path = tmp_path / name / 'expert_size_stats.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats))
    return str(path)


def nmi(mass):
    """I(E; S) / H(S), computed here independently of mmdet_moe."""
    joint = np.asarray(mass, dtype=float) / np.sum(mass)
    h = lambda p: -sum(x * np.log(x) for x in p.ravel() if x > 0)  # noqa: E731
    return (h(joint.sum(0)) + h(joint.sum(1)) - h(joint)) / h(joint.sum(0))


def ap(value):
    return {'coco/bbox_mAP': value, 'coco/bbox_mAP_s': value / 2,
            'coco/bbox_mAP_m': value, 'coco/bbox_mAP_l': 2 * value,
            'coco/bbox_mAP_50': 0.9}


# NMIs 0.527, 0.514, 0.473, 0.479: each within 2 sd of the other three
MASSES = [[[6.0, 2.0, 0.0], [0.0, 0.0, 2.0]],
          [[6.0, 2.2, 0.0], [0.0, 0.0, 2.0]],
          [[6.0, 2.0, 0.0], [0.0, 0.2, 2.0]],
          [[6.0, 2.0, 0.1], [0.0, 0.0, 2.0]]]
APS = [0.30, 0.31, 0.30, 0.31]


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], {(r[0], r[1]): r[2:] for r in rows[1:]}


def test_mean_sd_across_seeds_equal_numpy_and_files_are_written(tool, tmp_path, capsys):
    paths = [stats_file(tmp_path, f'seed{i}', m, metrics=ap(a))
             for i, (m, a) in enumerate(zip(MASSES, APS))]
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    header, rows = read_csv(tmp_path / 'stab' / 'seed_stability.csv')
    assert header == ['layer', 'figure', *paths, 'mean', 'sd', 'runs']
    nmis = [nmi(m) for m in MASSES]
    values = rows[(LAYER, 'nmi')]
    np.testing.assert_allclose([float(v) for v in values[:4]], nmis, rtol=1e-9)
    np.testing.assert_allclose(float(values[4]), np.mean(nmis), rtol=1e-9)
    np.testing.assert_allclose(float(values[5]), np.std(nmis, ddof=1), rtol=1e-9)
    assert values[6] == '4'
    for figure, scale in (('AP', 1), ('AP_S', 0.5), ('AP_M', 1), ('AP_L', 2)):
        values = rows[('detector', figure)]
        aps = np.array(APS) * scale
        np.testing.assert_allclose([float(v) for v in values[:4]], aps)
        np.testing.assert_allclose(float(values[4]), np.mean(aps), rtol=1e-9)
        np.testing.assert_allclose(float(values[5]), np.std(aps, ddof=1), rtol=1e-9)
    assert rows[(LAYER, 'living_experts')][:6] == ['2', '2', '2', '2', '2.0', '0.0']
    # the level-conditioned NMI needs level information these files do not hold
    assert (LAYER, 'nmi_given_level') not in rows
    assert (f'note: {LAYER} nmi_given_level unavailable in every run (statistics without '
            'level information') in printed
    md = (tmp_path / 'stab' / 'seed_stability.md').read_text()
    shown = f'{np.mean(nmis):.4f} ± {np.std(nmis, ddof=1):.4f}'
    assert shown in md and shown in printed
    assert 'WARNING' not in printed and 'Warnings' not in md
    assert all(p in md and p in printed for p in paths)


def test_an_outlier_run_is_warned_about_by_file_and_figure(tool, tmp_path, capsys):
    masses = MASSES[:3] + [[[3.0, 3.0, 2.0], [3.0, 3.0, 2.0]]]  # NMI 0, the others ~0.5
    paths = [stats_file(tmp_path, f'seed{i}', m, metrics=ap(a))
             for i, (m, a) in enumerate(zip(masses, APS))]
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith('WARNING')]
    others = [nmi(m) for m in masses[:3]]
    distance = abs(0 - np.mean(others)) / np.std(others, ddof=1)
    assert distance > 2
    assert warnings == [
        f'WARNING: run {paths[3]}: {LAYER} nmi = 0.0000 lies {distance:.1f} sd from the '
        f'mean of the other runs ({np.mean(others):.4f} ± {np.std(others, ddof=1):.4f}, '
        '3 runs; threshold 2 sd)']
    assert warnings[0] in (tmp_path / 'stab' / 'seed_stability.md').read_text()


def test_outlier_threshold_is_two_sd_of_the_other_runs(tool):
    paths = ['a.json', 'b.json', 'c.json', 'd.json']
    others = [1.0, 2.0, 3.0]  # mean 2, sd 1

    def flagged_d(values):
        return [w for w in tool.outliers('x', values, paths) if 'run d.json' in w]
    assert flagged_d([*others, 3.99]) == [] and flagged_d([*others, 0.01]) == []
    [warning] = flagged_d([*others, 4.01])
    assert warning.startswith('WARNING: run d.json: x = 4.0100 lies 2.0 sd from the mean of '
                              'the other runs (2.0000 ± 1.0000, 3 runs')
    assert len(flagged_d([*others, -0.01])) == 1
    # a run without the figure is left out of the others; fewer than 2 others: no check
    [warning] = tool.outliers('x', [1.0, None, 3.0, 9.0], paths)
    assert warning.startswith('WARNING: run d.json: x = 9.0000 lies 4.9 sd') and \
        '(2.0000 ± 1.4142, 2 runs;' in warning
    assert tool.outliers('x', [1.0, None, 9.0], paths[:3]) == []
    assert tool.outliers('x', [1.0, 1.0, 1.0, 1.0], paths) == []
    assert len(tool.outliers('x', [1.0, 1.0, 1.0, 1.5], paths)) == 1  # sd 0: any change


def test_old_files_without_metrics_say_ap_is_unavailable(tool, tmp_path, capsys):
    paths = [stats_file(tmp_path, 'seed0', MASSES[0], metrics=ap(0.3)),
             stats_file(tmp_path, 'seed1', MASSES[1], version=1),
             stats_file(tmp_path, 'seed2', MASSES[2], metrics=ap(0.32)),
             stats_file(tmp_path, 'seed3', MASSES[3],
                        metrics=dict(ap(0.31), **{'coco/bbox_mAP_s': -1.0}))]
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    assert f"note: {paths[1]}: AP unavailable (the file has no 'metrics'" in printed
    assert f'note: {paths[3]}: AP_S unavailable (coco/bbox_mAP_s is -1.0' in printed
    _, rows = read_csv(tmp_path / 'stab' / 'seed_stability.csv')
    values = rows[('detector', 'AP')]
    assert values[1] == '' and values[6] == '3'
    np.testing.assert_allclose(float(values[4]), np.mean([0.3, 0.32, 0.31]))
    np.testing.assert_allclose(float(values[5]), np.std([0.3, 0.32, 0.31], ddof=1))
    assert rows[('detector', 'AP_S')][6] == '2'


def test_no_file_with_metrics_drops_the_ap_rows(tool, tmp_path, capsys):
    paths = [stats_file(tmp_path, f's{i}', m) for i, m in enumerate(MASSES[:2])]
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    _, rows = read_csv(tmp_path / 'stab' / 'seed_stability.csv')
    assert set(rows) == {(LAYER, 'nmi'), (LAYER, 'living_experts')}
    assert "note: AP unavailable in every run (the file has no 'metrics'" in printed
    assert 'needs 3 runs or more; got 2' in printed


def test_level_conditioned_nmi_where_present(tool, tmp_path, monkeypatch, capsys):
    """'nmi_given_level' is compared when layer_summary gives it, and a run without
    it (None or no key) is named."""
    given = iter([0.10, 0.12, None, 0.11, 'absent'])
    real = tool.layer_summary

    def summary(layer, names):
        out = dict(real(layer, names))
        value = next(given)
        out.pop('nmi_given_level', None)
        if value != 'absent':
            out['nmi_given_level'] = value
        return out
    monkeypatch.setattr(tool, 'layer_summary', summary)
    paths = [stats_file(tmp_path, f's{i}', MASSES[i % 4], metrics=ap(0.3)) for i in range(5)]
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    _, rows = read_csv(tmp_path / 'stab' / 'seed_stability.csv')
    values = rows[(LAYER, 'nmi_given_level')]
    np.testing.assert_allclose(float(values[5]), np.mean([0.10, 0.12, 0.11]))
    np.testing.assert_allclose(float(values[6]), np.std([0.10, 0.12, 0.11], ddof=1))
    for missing in (paths[2], paths[4]):
        assert (f'{missing}: {LAYER} nmi_given_level unavailable (statistics without '
                'level information') in printed


def test_one_file_still_gives_the_report(tool, tmp_path, capsys):
    path = stats_file(tmp_path, 's0', MASSES[0], metrics=ap(0.3))
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 0
    assert (tmp_path / 'r' / 'report.md').is_file()
    assert not (tmp_path / 'r' / 'seed_stability.csv').exists()


def test_bad_runs_are_named(tool, tmp_path, capsys):
    good = stats_file(tmp_path, 'good', MASSES[0], metrics=ap(0.3))
    other_layer = stats_file(tmp_path, 'other', MASSES[1])
    data = json.loads(open(other_layer).read())
    data['layers']['neck.moe'] = data['layers'].pop(LAYER)
    open(other_layer, 'w').write(json.dumps(data))
    bad_metrics = stats_file(tmp_path, 'badm', MASSES[1], metrics=[0.3])
    bad_value = stats_file(tmp_path, 'badv', MASSES[1],
                           metrics=dict(ap(0.3), **{'coco/bbox_mAP': 'n/a'}))
    three = stats_file(tmp_path, 'three', MASSES[1])
    data = json.loads(open(three).read())
    layer = data['layers'][LAYER]  # a consistent 3-expert layer: one row more per table
    layer['num_experts'] = 3
    for table in (layer['detection']['mass'], layer['detection']['count'],
                  layer['classes']['mass'], layer['classes']['count'],
                  layer['image']['mass'], layer['levels']['mass'], layer['importance']):
        table.append([0.0] * len(table[0]) if isinstance(table[0], list) else 0.0)
    open(three, 'w').write(json.dumps(data))
    for path, match in [
            (other_layer, "holds MoE layers ['neck.moe']"),
            (bad_metrics, "'metrics' must be a dict of the evaluator's metrics, got [0.3]"),
            (bad_value, "coco/bbox_mAP is 'n/a', not a number"),
            (three, f'layer {LAYER} has 3 experts, 2 in'),
            (str(tmp_path / 'none.json'), 'no statistics file at')]:
        out = tmp_path / 'stab'
        assert tool.main([good, path, '--out-dir', str(out)]) == 2
        err = capsys.readouterr().err
        assert match in err and path in err, err
        assert not out.exists()
    for argv, match in [
            ([good, good], 'statistics file given more than once'),
            ([good, 'b.py'], "['b.py'] not .json statistics files"),
            (['a.py', 'b.pth', 'c.pth'], '3 paths that are not .json statistics files'),
            ([good, good.replace('good', 'other'), '--per-expert'], 'need CONFIG CHECKPOINT'),
            (['a.py', 'b.pth', '--k-sweep', '0'], 'every k must be >= 1, got 0')]:
        with pytest.raises(SystemExit):
            tool.parse_args([*argv, '--out-dir', str(tmp_path / 'x')])
        assert match in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_prints_the_warning(tmp_path):
    masses = MASSES[:3] + [[[3.0, 3.0, 2.0], [3.0, 3.0, 2.0]]]
    paths = [stats_file(tmp_path, f'seed{i}', m, metrics=ap(0.3)) for i, m in enumerate(masses)]
    proc = run_tool('analyze_experts.py', *paths, '--out-dir', tmp_path / 'stab')
    assert proc.returncode == 0, proc.output[-3000:]
    assert f'WARNING: run {paths[3]}: {LAYER} nmi = 0.0000' in proc.stdout
    assert 'report written to' in proc.stdout


# --per-expert: the equal-weight row, with a fake runner around a small MoE model


class FakeRunner:
    """runner.test() 'evaluates' the MoE on a fixed input: AP = mean of its output."""

    def __init__(self, model, work_dir, stats):
        import logging
        self.model, self.work_dir, self.stats = model, str(work_dir), stats
        self.logger = logging.getLogger('fake_runner')
        self.x = torch.randn(2, 4, 6, 6)

    def test(self):
        from mmdet_moe.engine.hooks import write_stats
        with torch.no_grad():
            value = float(self.model(self.x).mean())
        write_stats(self.stats, self.work_dir, 'test')
        return {key: value for key in ('coco/bbox_mAP', 'coco/bbox_mAP_s',
                                       'coco/bbox_mAP_m', 'coco/bbox_mAP_l')}


def test_per_expert_rows_include_all_experts_with_equal_weights(tool, tmp_path):
    from mmdet_moe.layers import MoE
    moe = MoE(expert_factory=lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
              num_experts=3, in_channels=4, top_k=2).eval()
    with open(stats_file(tmp_path, 'learned', MASSES[0])) as f:
        stats = json.load(f)
    runner = FakeRunner(moe, tmp_path / 'work', stats)
    args = tool.parse_args(['c.py', 'k.pth', '--out-dir', str(tmp_path / 'r'), '--per-expert',
                            '--k-sweep', '3'])
    _, rows = tool.evaluate(runner, args)
    labels = [r['routing'] for r in rows]
    assert labels == ['learned', 'expert 0 alone', 'expert 1 alone', 'expert 2 alone',
                      'all experts, equal weights (no gate)', 'top-3']
    with torch.no_grad():
        outputs = [e(runner.x) for e in moe.experts]
    equal = rows[4]
    assert equal['AP'] == pytest.approx(float(torch.stack(outputs).mean(0).mean()), rel=1e-5)
    for e in range(3):
        assert rows[1 + e]['AP_L'] == pytest.approx(float(outputs[e].mean()), rel=1e-5)
    assert moe.gate.forced_expert is None  # routing restored


def test_per_expert_bad_k_is_named_before_evaluating(tool, tmp_path):
    from mmdet_moe.layers import MoE
    moe = MoE(expert_factory=lambda: nn.Conv2d(4, 4, 1), num_experts=3, in_channels=4,
              top_k=2).eval()
    runner = FakeRunner(moe, tmp_path / 'work', None)
    args = tool.parse_args(['c.py', 'k.pth', '--out-dir', str(tmp_path / 'r'),
                            '--k-sweep', '4'])
    with pytest.raises(tool.ReportError, match=r'cannot force routing to top-4: .*top_k=4 '
                                                r'is out of range \[1, 3\]'):
        tool.evaluate(runner, args)


def conditional_nmi(table):
    """NMI(E; S | L) of an (N, S, L) mass table, computed here independently."""
    table = np.asarray(table, dtype=float)
    h = lambda p: -sum(x * np.log(x) for x in p.ravel() if x > 0)  # noqa: E731
    mutual = entropy = 0.0
    for level in range(table.shape[2]):
        part = table[:, :, level]
        if part.sum() == 0:
            continue
        p_level, joint = part.sum() / table.sum(), part / part.sum()
        h_size = h(joint.sum(0))
        mutual += p_level * (h_size + h(joint.sum(1)) - h(joint))
        entropy += p_level * h_size
    return mutual / entropy


def test_level_conditioned_nmi_of_files_with_level_information(tool, tmp_path, capsys):
    """Statistics written with the expert × size × level table give the level-conditioned
    NMI of each run, its mean and sd."""
    rng = np.random.default_rng(0)
    paths, values = [], []
    for i, mass in enumerate(MASSES):
        levels = rng.uniform(0.5, 2.0, size=(2, 3, 2))  # expert × size × level
        path = stats_file(tmp_path, f'seed{i}', mass, metrics=ap(0.3))
        data = json.loads(open(path).read())
        data['layers'][LAYER]['detection_levels'] = dict(mass=levels.tolist())
        open(path, 'w').write(json.dumps(data))
        paths.append(path)
        values.append(conditional_nmi(levels))
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    assert 'nmi_given_level unavailable' not in capsys.readouterr().out
    _, rows = read_csv(tmp_path / 'stab' / 'seed_stability.csv')
    got = rows[(LAYER, 'nmi_given_level')]
    np.testing.assert_allclose([float(v) for v in got[:4]], values, rtol=1e-9)
    np.testing.assert_allclose(float(got[4]), np.mean(values), rtol=1e-9)
    np.testing.assert_allclose(float(got[5]), np.std(values, ddof=1), rtol=1e-9)
