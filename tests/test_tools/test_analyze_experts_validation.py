"""tools/analyze_experts.py on malformed statistics files: each defect is named by file
and JSON path with what would be right, on stderr, exit code 2, no traceback; valid
files of every readable schema version still give a report."""
import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

from helpers import load_tool, run_tool
from mmdet_moe.analysis import StatsFormatError, validate_stats

HEAD, NECK = 'bbox_head.cls_moe', 'neck.moe'
AT = f'layers["{HEAD}"]'


@pytest.fixture(scope='module')
def tool():
    return load_tool('analyze_experts.py')


def hook_stats(score_thr: float = 0.5) -> dict:
    """Statistics as ExpertSizeStatsHook writes them (schema version 3), summed from
    two hand-made images: a head gated per (image, FPN level), a neck per image."""
    from mmdet_moe.engine.hooks import ExpertSizeStatsHook
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    from mmdet_moe.engine.hooks.ground_truth import GroundTruth
    from mmdet_moe.layers import GateRecorder

    class Dataset:
        metainfo = dict(classes=('a', 'b'))

    hook = ExpertSizeStatsHook(score_thr=score_thr, shuffle_permutations=3,
                               bootstrap_resamples=20)
    hook.layer_names, hook._classes = [HEAD, NECK], ['a', 'b']
    hook._gt = GroundTruth(Dataset())
    hook._reference_sizes = [32.0, 64.0]  # what before_run reads from a 2-level head
    recorder = GateRecorder()
    recorder.add(HEAD, torch.tensor([[1., 0.], [0., 1.]]), level=0)
    recorder.add(HEAD, torch.tensor([[.5, .5], [.25, .75]]), level=1)
    recorder.add(NECK, torch.tensor([[0., 1.], [1., 0.]]))

    def sample(img_id, boxes, scores, labels, levels, gt_boxes, gt_labels):
        s = DetDataSample(metainfo=dict(img_id=img_id, scale_factor=(1.0, 1.0)))
        s.pred_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float).reshape(-1, 4),
            scores=torch.tensor(scores), labels=torch.tensor(labels),
            levels=torch.tensor(levels))
        s.gt_instances = InstanceData(
            bboxes=torch.tensor(gt_boxes, dtype=torch.float).reshape(-1, 4),
            labels=torch.tensor(gt_labels, dtype=torch.long))
        return s
    samples = [sample(1, [[0, 0, 10, 10], [0, 0, 100, 100]], [.9, .8], [0, 1], [0, 1],
                      [[0, 0, 10, 10], [0, 0, 40, 40]], [0, 1]),
               sample(2, [[0, 0, 40, 40]], [.95], [1], [1], [[0, 0, 200, 200]], [1])]
    layers = rows_by_layer(recorder)
    images = [hook._image_record(b, s, layers) for b, s in enumerate(samples)]
    stats = hook.summarise(images, 'test', 0, 0)
    stats['metrics'] = {'coco/bbox_mAP': 0.3}
    return json.loads(json.dumps(stats))  # as read back from the file


@pytest.fixture(scope='module')
def valid():
    return hook_stats()


def write(tmp_path, stats, name: str = 'stats') -> str:
    path = tmp_path / name / 'expert_size_stats.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stats if isinstance(stats, str) else json.dumps(stats))
    return str(path)


def set_at(stats: dict, keys: tuple, value) -> None:
    """stats[k0][k1]...[kn] = value; value DELETE removes the key."""
    for key in keys[:-1]:
        stats = stats[key]
    if value is DELETE:
        del stats[keys[-1]]
    else:
        stats[keys[-1]] = value


DELETE = object()
L = ('layers', HEAD)

# (what changes, the value there, words the error must hold)
CORRUPTIONS = [
    (('schema',), 'other/stats', "schema 'other/stats', expected 'mmdet_moe/expert_size_stats'"),
    (('version',), 4, 'version 4 is not supported; this mmdet_moe reads versions 1, 2 and 3'),
    (('version',), '2', 'version \'2\' is not supported'),
    (('version',), True, 'version True is not supported'),
    (('num_images',), DELETE, "the file has no 'num_images' (required: the number of "
                              'images evaluated'),
    (('layers',), DELETE, "the file has no 'layers'"),
    (('size_buckets', 'names'), ['small', 'large'],
     'size_buckets.names = ["small", "large"]: expected the names of the 3 size buckets'),
    (('num_detections',), -1, 'num_detections = -1: expected an integer >= 0'),
    (('num_images',), 2.5, 'num_images = 2.5: expected an integer >= 0'),
    (('score_thr',), 'high', 'score_thr = "high": expected a number in [0, 1]'),
    (('mode',), 'train', 'mode = "train": expected "val" or "test"'),
    (('gt_per_bucket', 1), math.nan, 'gt_per_bucket[1] = NaN: expected a finite number >= 0'),
    (('gt_per_bucket',), [1, 2], 'gt_per_bucket has 2 size buckets, expected 3'),
    (('layers',), [1], 'layers = [1]: expected an object'),
    (L, 'x', f'{AT} = "x": expected an object'),
    (L + ('image',), DELETE, f"{AT} has no 'image' (required"),
    (L + ('detection', 'mass'), DELETE, f"{AT}.detection has no 'mass' (required"),
    (L + ('importance',), DELETE, f"{AT} has no 'importance' (required"),
    (L + ('num_experts',), '2', f'{AT}.num_experts = "2": expected an integer >= 1'),
    (L + ('detection', 'mass', 1, 2), math.nan,
     f'{AT}.detection.mass[1][2] = NaN: expected a finite number >= 0'),
    (L + ('detection', 'mass', 0, 0), math.inf,
     f'{AT}.detection.mass[0][0] = Infinity: expected a finite number >= 0'),
    (L + ('detection', 'count', 0, 1), -1.0,
     f'{AT}.detection.count[0][1] = -1.0: expected a finite number >= 0 (a count)'),
    (L + ('detection', 'mass', 0, 1), '1',
     f'{AT}.detection.mass[0][1] = "1": expected a finite number >= 0'),
    (L + ('detection', 'mass', 0, 1), None,
     f'{AT}.detection.mass[0][1] = null: expected a finite number >= 0'),
    (L + ('importance', 1), -math.inf, f'{AT}.importance[1] = -Infinity'),
    (L + ('rows',), -4, f'{AT}.rows = -4: expected an integer >= 0'),
    (L + ('rows',), math.nan, f'{AT}.rows = NaN: expected an integer >= 0'),
    (L + ('image', 'mass', 1, 0), -0.5, f'{AT}.image.mass[1][0] = -0.5'),
    (L + ('classes', 'mass', 0, 0), math.nan, f'{AT}.classes.mass[0][0] = NaN'),
    (L + ('levels', 'mass', 1, 1), math.nan, f'{AT}.levels.mass[1][1] = NaN'),
    (L + ('levels', 'rows'), -2, f'{AT}.levels.rows = -2: expected an integer >= 0'),
    (L + ('detection_levels', 'mass', 0, 2, 1), math.nan,
     f'{AT}.detection_levels.mass[0][2][1] = NaN'),
    (L + ('detection', 'mass', 0), [1.0, 0.0, 0.0, 0.0],
     f'{AT}.detection.mass[0] has 4 size buckets, expected 3 (size_buckets.names: '
     'small, medium, large)'),
    (L + ('detection', 'mass'), [[1.0, 0.0, 0.0]],
     f'{AT}.detection.mass has 1 expert rows, expected 2 (num_experts)'),
    (L + ('image', 'mass'), [[0.0, 0.0, 0.0]] * 3,
     f'{AT}.image.mass has 3 expert rows, expected 2 (num_experts)'),
    (L + ('importance',), [1.0, 1.0, 1.0],
     f'{AT}.importance has 3 expert rows, expected 2 (num_experts)'),
    (L + ('detection', 'mass'), 7, f'{AT}.detection.mass = 7: expected a list of 2 expert rows'),
    (L + ('classes', 'mass', 0), [1.0], f'{AT}.classes.mass[0] has 1 classes, expected 2 '
                                        '(one per name in "classes")'),
    (L + ('levels', 'mass', 1), [1.0, 2.0, 3.0],
     f'{AT}.levels.mass[1] has 3 FPN levels, expected 2 (as in'),
    (L + ('detection_levels', 'mass', 0, 0), 1.0,
     f'{AT}.detection_levels.mass[0][0] = 1.0: expected a list of FPN levels'),
    (L + ('nmi_shuffled', 'mean'), math.nan, f'{AT}.nmi_shuffled.mean = NaN'),
    (L + ('nmi_shuffled', 'interval'), [0.1],
     f'{AT}.nmi_shuffled.interval has 1 bounds, expected 2 ([lower, upper])'),
    (L + ('nmi_given_level_shuffled', 'interval'), [0.3, 0.1],
     f'{AT}.nmi_given_level_shuffled.interval = [0.3, 0.1]: expected lower <= upper'),
    (L + ('intervals', 'nmi', 0), math.nan, f'{AT}.intervals.nmi[0] = NaN'),
    (L + ('intervals', 'p_size_given_expert', 1, 2), [0.5],
     f'{AT}.intervals.p_size_given_expert[1][2] has 1 bounds, expected 2'),
    (L + ('relative_scale',), [], f'{AT}.relative_scale = []: expected an object'),
    (L + ('relative_scale', 'absent'), 3, f'{AT}.relative_scale.absent = 3: expected a '
                                          'string saying why'),
    (L + ('relative_scale', 'bins'), 1, f'{AT}.relative_scale.bins = 1: expected an '
                                        'integer >= 2'),
    (L + ('relative_scale', 'reference_sizes', 1), 0.0,
     f'{AT}.relative_scale.reference_sizes[1] = 0.0: expected a reference size > 0'),
    (L + ('relative_scale', 'edges'), [None],
     f'{AT}.relative_scale.edges = [null]: expected a list of 2 levels\' edges'),
    (L + ('relative_scale', 'edges', 1), [0.0, 1.0],
     f'{AT}.relative_scale.edges[1] = [0.0, 1.0]: expected 5 quantile edges (bins + 1)'),
    (L + ('relative_scale', 'edges', 1, 2), -9.0,
     f'{AT}.relative_scale.edges[1]'),
    (L + ('relative_scale', 'edges', 0, 0), math.nan,
     f'{AT}.relative_scale.edges[0][0] = NaN: expected a finite number'),
    (L + ('relative_scale', 'mass', 0), [[0.0, 0.0]] * 5,
     f'{AT}.relative_scale.mass[0] has 5 bins, expected 4'),
    (L + ('relative_scale', 'nmi_given_level'), 1.5,
     f'{AT}.relative_scale.nmi_given_level = 1.5: expected an NMI in [0, 1]'),
    (L + ('relative_scale', 'interval'), [0.5, 0.1],
     f'{AT}.relative_scale.interval = [0.5, 0.1]: expected lower <= upper'),
    (L + ('relative_scale', 'shuffled_within_image_level'), DELETE,
     f"{AT}.relative_scale has no 'shuffled_within_image_level'"),
    (L + ('relative_scale', 'shuffled_within_level', 'std'), -1.0,
     f'{AT}.relative_scale.shuffled_within_level.std = -1.0'),
]


def corrupt(stats: dict, keys: tuple, value) -> dict:
    stats = copy.deepcopy(stats)
    set_at(stats, keys, value)
    return stats


@pytest.mark.parametrize('keys, value, words', CORRUPTIONS,
                         ids=[f'{".".join(map(str, k))}={v!r}'[:60] for k, v, _ in CORRUPTIONS])
def test_each_defect_is_named_by_file_and_json_path(tool, valid, tmp_path, capsys, keys,
                                                    value, words):
    path = write(tmp_path, corrupt(valid, keys, value))
    out = tmp_path / 'report'
    assert tool.main([path, '--out-dir', str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f'analyze_experts: error: {path}: '), captured.err
    assert words in captured.err, captured.err
    assert 'Traceback' not in captured.err and captured.out == ''
    assert not out.exists()


def test_validate_stats_is_pure_and_raises_a_value_error(valid):
    stats = corrupt(valid, L + ('detection', 'mass', 1, 1), math.nan)
    before = json.dumps(stats)
    with pytest.raises(StatsFormatError) as info:
        validate_stats(stats)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (f'{AT}.detection.mass[1][1] = NaN: expected a finite number '
                               '>= 0 (gate mass)')
    assert json.dumps(stats) == before
    validate_stats(valid)


@pytest.mark.parametrize('text, words', [
    ('{"schema": ', 'is not valid JSON'),
    ('[1, 2]', 'the file holds a JSON list, expected an object'),
    ('"stats"', 'the file holds a JSON string, expected an object'),
])
def test_not_a_statistics_object(tool, tmp_path, capsys, text, words):
    path = write(tmp_path, text)
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err
    assert path in err and words in err, err


def test_a_match_gt_file_needs_its_iou_threshold(tool, valid, tmp_path, capsys):
    stats = corrupt(valid, ('match_gt',), True)
    del stats['iou_thr']
    path = write(tmp_path, stats)
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err
    assert "the file has no 'iou_thr' (required: the IoU threshold of match_gt" in err, err


def test_valid_statistics_still_give_the_report(tool, valid, tmp_path, capsys):
    path = write(tmp_path, valid)
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 0
    assert (tmp_path / 'r' / 'report.md').is_file()
    captured = capsys.readouterr()
    assert captured.err == ''
    # the within-level scale measure beside the S/M/L figures, printed and reported
    assert captured.out.count('NMI expert↔relative scale | FPN level') == 2
    report = (tmp_path / 'r' / 'report.md').read_text()
    assert 'Within-level scale (4 quantile bins' in report
    assert (tmp_path / 'r' / f'{HEAD}_relative_scale.csv').is_file()


def version_1(stats: dict) -> dict:
    """The same statistics as written before schema version 2: no level-controlled
    view, no intervals, no metrics, baselines without an interval."""
    stats = copy.deepcopy(stats)
    stats['version'] = 1
    del stats['metrics']
    for layer in stats['layers'].values():
        for key in ('detection_levels', 'nmi_given_level', 'nmi_given_level_shuffled',
                    'intervals', 'relative_scale'):
            del layer[key]
        del layer['nmi_shuffled']['interval']
    return stats


def test_files_written_before_schema_version_2_are_still_read(tool, valid, tmp_path,
                                                              capsys):
    path = write(tmp_path, version_1(valid))
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 0
    assert 'written before schema version 2' in (tmp_path / 'r' / 'report.md').read_text()


def test_files_written_before_schema_version_3_are_read_without_the_measure(
        tool, valid, tmp_path, capsys):
    stats = copy.deepcopy(valid)
    stats['version'] = 2
    for layer in stats['layers'].values():
        del layer['relative_scale']
    assert tool.main([write(tmp_path, stats), '--out-dir', str(tmp_path / 'r')]) == 0
    assert 'written before schema version 3' in capsys.readouterr().out


def test_optional_views_may_be_absent(tool, valid, tmp_path):
    """No level tags (detection_levels null), no bootstrap (intervals null), a layer
    without per-level gate rows (levels null), no classes: all as the hook writes."""
    stats = copy.deepcopy(valid)
    for layer in stats['layers'].values():
        layer.update(detection_levels=None, nmi_given_level=None,
                     nmi_given_level_shuffled=None, intervals=None, levels=None,
                     classes=dict(mass=[[], []], count=[[], []]))
    stats['classes'] = []
    assert tool.main([write(tmp_path, stats), '--out-dir', str(tmp_path / 'r')]) == 0


def test_a_malformed_seed_run_is_named(tool, valid, tmp_path, capsys):
    good = [write(tmp_path, valid, f'seed{i}') for i in range(2)]
    bad = write(tmp_path, corrupt(valid, L + ('importance', 0), -1.0), 'seed2')
    out = tmp_path / 'stab'
    assert tool.main([*good, bad, '--out-dir', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'analyze_experts: error: {bad}: {AT}.importance[0] = -1.0'), err
    assert not out.exists()


@pytest.mark.slow
def test_command_line_exits_2_without_traceback(valid, tmp_path):
    path = write(tmp_path, corrupt(valid, L + ('detection', 'mass', 1, 2), math.nan))
    proc = run_tool('analyze_experts.py', path, '--out-dir', tmp_path / 'r')
    assert proc.returncode == 2, proc.output[-3000:]
    assert 'Traceback' not in proc.stderr
    assert (f'{path}: {AT}.detection.mass[1][2] = NaN: expected a finite number >= 0'
            in proc.stderr), proc.stderr
    assert not (tmp_path / 'r').exists()


def test_the_hook_output_has_every_table(valid):
    """The corruptions above reach real tables (not keys this file lacks)."""
    layer = valid['layers'][HEAD]
    assert np.shape(layer['detection_levels']['mass']) == (2, 3, 2)
    assert np.shape(layer['levels']['mass']) == (2, 2)
    assert np.shape(layer['intervals']['p_size_given_expert']) == (2, 3, 2)
    assert layer['nmi_given_level_shuffled']['interval'][0] <= \
        layer['nmi_given_level_shuffled']['interval'][1]


# a run with no detection above score_thr: valid, but only its image view has data


def test_statistics_without_detections_report_the_image_view_alone(tool, tmp_path, capsys):
    stats = hook_stats(score_thr=0.99)
    assert stats['num_detections'] == 0
    path = write(tmp_path, stats)
    assert tool.main([path, '--out-dir', str(tmp_path / 'r')]) == 0
    printed = capsys.readouterr().out
    assert f'{HEAD}\n  NMI expert↔size, image view (per-image gates × ground-truth sizes): ' \
        in printed
    assert 'shuffled' not in printed and 'FPN level' not in printed, printed
    text = (tmp_path / 'r' / 'report.md').read_text()
    assert 'shuffled' not in text.split(f'## {HEAD}')[1], text
    assert 'Within each FPN level' not in text  # its tables would be all zero


def test_a_seed_run_without_detections_leaves_its_nmis_out(tool, valid, tmp_path, capsys):
    """Its image-view NMI is no sample of the detection-view NMI of the other runs."""
    paths = [write(tmp_path, valid, f'seed{i}') for i in range(2)]
    paths.append(write(tmp_path, hook_stats(score_thr=0.99), 'seed2'))
    assert tool.main([*paths, '--out-dir', str(tmp_path / 'stab')]) == 0
    printed = capsys.readouterr().out
    assert (f'note: {paths[2]}: {HEAD} nmi, {HEAD} nmi_given_level, '
            f'{HEAD} nmi_rel_scale_given_level, {NECK} nmi, {NECK} nmi_given_level, '
            f'{NECK} nmi_rel_scale_given_level unavailable (no detection above score_thr'
            ) in printed
    with open(tmp_path / 'stab' / 'seed_stability.csv') as f:
        rows = {(r[0], r[1]): r[2:] for r in csv.reader(f)}
    assert rows[(HEAD, 'nmi')][2] == '' and rows[(HEAD, 'nmi')][-1] == '2'
    assert rows[(HEAD, 'living_experts')][-1] == '3'
    assert rows[(HEAD, 'nmi_rel_scale_given_level')][-1] == '2'
