"""ExpertSizeStatsHook on hand-made DetDataSamples with known gates and boxes."""
import json

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

from mmdet_moe.engine.hooks import ExpertSizeStatsHook
from mmdet_moe.engine.hooks.expert_size_stats_hook import match_to_gt
from mmdet_moe.engine.hooks.ground_truth import GroundTruth
from mmdet_moe.layers import GateRecorder


class FakeDataset:
    metainfo = dict(classes=('a', 'b'))


def sample(img_id, det_boxes, det_scores, det_labels, det_levels, gt_boxes, gt_labels,
           scale=(2.0, 2.0)):
    s = DetDataSample(metainfo=dict(img_id=img_id, scale_factor=scale))
    s.pred_instances = InstanceData(
        bboxes=torch.tensor(det_boxes, dtype=torch.float).reshape(-1, 4),
        scores=torch.tensor(det_scores, dtype=torch.float),
        labels=torch.tensor(det_labels, dtype=torch.long),
        levels=torch.tensor(det_levels, dtype=torch.long))
    # gt in the resized image: the hook rescales by 1 / scale_factor
    gt = torch.tensor(gt_boxes, dtype=torch.float).reshape(-1, 4) * scale[0]
    s.gt_instances = InstanceData(bboxes=gt, labels=torch.tensor(gt_labels, dtype=torch.long))
    return s


def make_hook(**kwargs):
    hook = ExpertSizeStatsHook(**kwargs)
    hook.layer_names = ['head', 'neck']
    hook._classes = ['a', 'b']
    hook._gt = GroundTruth(FakeDataset())
    return hook


def batch():
    """Two images; head gates per (image, level) for 2 levels, neck gates per image."""
    recorder = GateRecorder()
    recorder.add('head', torch.tensor([[1., 0.], [0., 1.]]), level=0)   # level 0
    recorder.add('head', torch.tensor([[.5, .5], [.25, .75]]), level=1)  # level 1
    recorder.add('neck', torch.tensor([[0., 1.], [1., 0.]]))
    samples = [
        # image 1: a small det at level 0 (area 100), a large one at level 1 (100²),
        # and one below the score threshold
        sample(1, [[0, 0, 10, 10], [0, 0, 100, 100], [0, 0, 50, 50]], [.9, .8, .1],
               [0, 1, 0], [0, 1, 1], gt_boxes=[[0, 0, 10, 10], [0, 0, 40, 40]],
               gt_labels=[0, 1]),
        # image 2: one medium det (40×40) at level 1; no GT
        sample(2, [[0, 0, 40, 40]], [.95], [1], [1], gt_boxes=[], gt_labels=[]),
    ]
    return recorder, samples


def test_known_gates_and_boxes_give_a_known_matrix():
    hook = make_hook(score_thr=0.5, shuffle_permutations=3)
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    recorder, samples = batch()
    layers = rows_by_layer(recorder)
    images = [hook._image_record(b, s, layers) for b, s in enumerate(samples)]
    stats = hook.summarise(images, 'test', 0, 0)
    head, neck = stats['layers']['head'], stats['layers']['neck']
    # head: img1 small det gets level-0 row [1, 0]; img1 large det gets [.5, .5];
    # img2 medium det gets image 2's level-1 row [.25, .75]
    np.testing.assert_allclose(head['detection']['mass'], [[1, .25, .5], [0, .75, .5]])
    np.testing.assert_allclose(head['detection']['count'], [[1, 1, 1], [0, 1, 1]])
    # neck: one row per image for all its detections
    np.testing.assert_allclose(neck['detection']['mass'], [[0, 1, 0], [1, 0, 1]])
    # classes: labels of kept detections a (small), b (large), b (medium)
    np.testing.assert_allclose(head['classes']['mass'], [[1, .75], [0, 1.25]])
    # image view: image 1's mean head row [.75, .25] × its GT histogram
    # (10×10 small, 40×40 medium, in original pixels); image 2 has no GT
    np.testing.assert_allclose(head['image']['mass'], [[.75, .75, 0], [.25, .25, 0]])
    np.testing.assert_allclose(head['levels']['mass'], [[1, .75], [1, 1.25]])
    assert neck['levels'] is None
    np.testing.assert_allclose(head['importance'], [1.75, 2.25])
    assert head['rows'] == 4 and neck['rows'] == 2
    assert stats['num_detections'] == 3 and stats['gt_per_bucket'] == [1, 1, 0]
    assert stats['version'] == 3 and stats['size_buckets']['names'] == ['small', 'medium', 'large']
    # per level: the small det (P3) and the large and medium dets (P4), by hand
    levels = np.zeros((2, 3, 2))
    levels[:, 0, 0] = [1, 0]                   # small, level 0, row [1, 0]
    levels[:, 2, 1] = [.5, .5]                 # large, level 1, image 1's row
    levels[:, 1, 1] = [.25, .75]               # medium, level 1, image 2's row
    np.testing.assert_allclose(head['detection_levels']['mass'], levels)
    # P3 holds one size only: no size entropy within it; P4: medium and large, the
    # expert rows [.5, .5] and [.25, .75] differ slightly → a small NMI | level
    assert 0 < head['nmi_given_level'] < 0.1
    for layer in (head, neck):
        assert {'nmi_given_level_shuffled', 'intervals'} <= set(layer)
        assert layer['intervals']['resamples'] == 1000
        assert layer['intervals']['nmi'][0] <= layer['intervals']['nmi'][1]
    json.dumps(stats)  # serialisable


def test_match_gt_keeps_matched_detections_bucketed_by_their_gt():
    hook = make_hook(score_thr=0.5, match_gt=True, shuffle_permutations=1)
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    recorder, samples = batch()
    images = [hook._image_record(b, s, rows_by_layer(recorder)) for b, s in enumerate(samples)]
    stats = hook.summarise(images, 'test', 0, 0)
    # only the 10×10 detection of image 1 matches a GT (same class, IoU 1)
    assert stats['num_detections'] == 1
    np.testing.assert_allclose(stats['layers']['head']['detection']['mass'], [[1, 0, 0], [0, 0, 0]])


def test_matching_is_greedy_by_score_with_iou_threshold_inclusive():
    gt = np.array([[0, 0, 10, 20], [0, 0, 10, 21], [50, 50, 60, 60]], dtype=float)
    gt_labels = np.array([0, 0, 1])
    dets = np.array([[0, 0, 10, 10],     # IoU 100/200 = 0.5 with gt 0, 100/210 with gt 1
                     [0, 0, 10, 10],     # same box, lower score: gt 0 is taken, 1 too small
                     [0, 0, 10, 21],     # IoU 1 with gt 1
                     [50, 50, 60, 60]])  # right box, wrong class
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 0, 0, 0])
    assert match_to_gt(dets, scores, labels, gt, gt_labels, 0.5).tolist() == [0, -1, 1, -1]
    # the lower-scored duplicate would match gt 0 if it came first
    assert match_to_gt(dets, scores[::-1].copy(), labels, gt, gt_labels, 0.5).tolist() == \
        [-1, 0, 1, -1]


def test_no_detection_and_no_ground_truth():
    hook = make_hook(score_thr=0.99, shuffle_permutations=1)
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    recorder, samples = batch()
    images = [hook._image_record(b, s, rows_by_layer(recorder)) for b, s in enumerate(samples)]
    stats = hook.summarise(images, 'val', 1, 10)
    assert stats['num_detections'] == 0
    assert np.sum(stats['layers']['head']['detection']['mass']) == 0
    assert stats['layers']['head']['nmi_shuffled']['mean'] == 0


def test_coco_annotation_area_is_used(tmp_path):
    ann = dict(images=[dict(id=7, width=100, height=100, file_name='x.png')],
               categories=[dict(id=3, name='a')],
               annotations=[dict(id=1, image_id=7, category_id=3, iscrowd=0, area=1024.0,
                                 bbox=[0, 0, 40, 40]),
                            dict(id=2, image_id=7, category_id=3, iscrowd=1, area=5.0,
                                 bbox=[0, 0, 1, 5])])
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(ann))

    class CocoLike:
        ann_file = str(path)
        cat2label = {3: 0}
    boxes, areas, labels = GroundTruth(CocoLike())(DetDataSample(metainfo=dict(img_id=7)))
    assert areas.tolist() == [1024.0] and labels.tolist() == [0]  # crowd left out
    assert boxes.tolist() == [[0, 0, 40, 40]]


def test_bad_arguments():
    with pytest.raises(ValueError, match='score_thr'):
        ExpertSizeStatsHook(score_thr=1.5)
    with pytest.raises(ValueError, match='iou_thr'):
        ExpertSizeStatsHook(iou_thr=0)


def stats_of_two_images(model, hook, predict):
    """The hook's statistics, the inputs and the outputs of ``predict(inputs,
    samples)`` on two random 96-px images, each with one 40-px ground-truth box."""
    from types import SimpleNamespace

    from mmdet_moe.layers import record_gates
    hook.before_run(SimpleNamespace(model=model))
    hook._classes, hook._gt = list('abcde'), GroundTruth(FakeDataset())
    inputs = torch.randn(2, 3, 96, 96)
    samples = [DetDataSample(metainfo=dict(img_id=i, img_shape=(96, 96), ori_shape=(96, 96),
                                           scale_factor=(1.0, 1.0), pad_shape=(96, 96),
                                           batch_input_shape=(96, 96))) for i in range(2)]
    for s in samples:
        s.gt_instances = InstanceData(bboxes=torch.tensor([[0., 0., 40., 40.]]),
                                      labels=torch.tensor([0]))
    with record_gates(model) as recorder, torch.no_grad():
        outputs = predict(inputs, samples)
    hook.recorder = recorder
    hook._collect(outputs)
    return hook.summarise(hook._images, 'test', 0, 0), inputs, outputs


def test_shared_head_reports_the_layer_that_routes():
    """Defect: KeyError on a head with moe_branches='shared' (the reg MoE reuses the
    cls gate and records nothing). Its statistics are the cls MoE's; the reference is
    the gate of cls_moe applied to each level by hand."""
    from helpers import build_model, toy_retinanet
    model = build_model(toy_retinanet(moe_branches='shared')).eval()
    hook = ExpertSizeStatsHook(score_thr=0.0)
    stats, inputs, _ = stats_of_two_images(model, hook, model.predict)
    assert hook.layer_names == ['bbox_head.cls_moe', 'bbox_head.reg_moe']
    assert list(stats['layers']) == ['bbox_head.cls_moe']
    assert stats['shared_routing'] == {'bbox_head.reg_moe': 'bbox_head.cls_moe'}
    gate = model.bbox_head.cls_moe.gate
    with torch.no_grad():
        rows = torch.stack([gate(level).weights for level in model.extract_feat(inputs)])
    np.testing.assert_allclose(stats['layers']['bbox_head.cls_moe']['importance'],
                               rows.sum((0, 1)).numpy(), rtol=1e-5)


def test_a_layer_that_never_routes_is_not_dropped_silently():
    hook = make_hook()
    hook.layer_names = ['head', 'neck', 'unused']
    recorder, samples = batch()
    hook.recorder = recorder
    hook._collect(samples)
    with pytest.raises(RuntimeError, match='unused recorded no gate rows'):
        hook.summarise(hook._images, 'test', 0, 0)


def test_each_detection_keeps_the_gate_weights_its_head_tagged():
    """A head that tags detections (per-pixel gates: a vector per detection) names the
    layers of ``expert_weights`` in the metainfo; the hook takes those, not the
    (image, level) rows."""
    hook = make_hook(score_thr=0.5, shuffle_permutations=1)
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    recorder, samples = batch()
    own = {1: [[.2, .8], [.6, .4], [.5, .5]], 2: [[.9, .1]]}
    for s in samples:
        pred = s.pred_instances
        pred.expert_weights = torch.tensor(own[s.metainfo['img_id']])[:, None]
        pred.set_metainfo(dict(expert_layers=['head']))
    images = [hook._image_record(b, s, rows_by_layer(recorder)) for b, s in enumerate(samples)]
    stats = hook.summarise(images, 'val', 1, 10)
    # small: [.2, .8], medium: [.9, .1], large: [.6, .4]; the neck keeps its rows
    np.testing.assert_allclose(stats['layers']['head']['detection']['mass'],
                               [[.2, .9, .6], [.8, .1, .4]], rtol=1e-6)
    np.testing.assert_allclose(stats['layers']['neck']['detection']['mass'],
                               [[0, 1, 0], [1, 0, 1]])


def test_a_test_run_does_not_build_the_training_loop(tmp_path):
    """tools/test.py's Runner holds the training config too; reading ``runner.epoch``
    there builds the train loop and loads its dataset (COCO train2017: its 450 MB of
    annotations). The test-mode statistics say epoch 0, iteration 0 without it."""
    from mmengine.runner import BaseLoop, Runner

    from helpers import TOY_MOE_CONFIG, load_config, make_tiny_coco, toy_overrides
    data = make_tiny_coco(tmp_path / 'data', train=2, val=2, size=64)
    cfg = load_config(TOY_MOE_CONFIG, **toy_overrides(data),
                      **{'train_dataloader.dataset.ann_file': 'no_such_file.json'})
    cfg.work_dir = str(tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    runner.test()
    stats = json.loads((tmp_path / 'work' / 'expert_size_stats' / 'test.json').read_text())
    assert (stats['mode'], stats['epoch'], stats['iter'], stats['num_images']) == \
        ('test', 0, 0, 2)
    assert not isinstance(runner._train_loop, BaseLoop)  # still its config


def test_the_json_carries_the_within_level_scale_measure(tmp_path):
    """Per-location tags on the head, per-image rows on the neck, s_l = 8 and 16
    input pixels: relative scales, per-level quantile edges, the (N, bins, L) table and its NMI,
    by hand; the per-image neck equals its within-(image, level) baseline; the
    measure is logged as ``<layer>.nmi_rel_scale_given_level``."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub, MMLogger

    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    hook = make_hook(score_thr=0.5, shuffle_permutations=5, bootstrap_resamples=50,
                     relative_scale_bins=2)
    hook._reference_sizes = [8.0, 16.0]
    recorder, samples = batch()
    own = {1: [[.2, .8], [.6, .4], [.5, .5]], 2: [[.9, .1]]}
    for s in samples:
        s.pred_instances.expert_weights = torch.tensor(own[s.metainfo['img_id']])[:, None]
        s.pred_instances.set_metainfo(dict(expert_layers=['head']))
    hook._images = [hook._image_record(b, s, rows_by_layer(recorder))
                    for b, s in enumerate(samples)]
    hook._dataset = samples
    hub = MessageHub.get_instance('test_relative_scale_in_the_json')
    runner = SimpleNamespace(work_dir=str(tmp_path), epoch=1, iter=10, message_hub=hub,
                             logger=MMLogger.get_current_instance())
    hook._finish(runner, 'val_epoch_1', 'val', None)
    stats = json.loads((tmp_path / 'expert_size_stats.json').read_text())
    head, neck = (stats['layers'][n]['relative_scale'] for n in ('head', 'neck'))
    # kept: image 1 10×10 at P3 and 100×100 at P4, image 2 40×40 at P4, in original
    # pixels; the images were resized by 2 (s_l is in input pixels)
    p3, p4_large, p4_medium = np.log2(20 / 8), np.log2(200 / 16), np.log2(80 / 16)
    assert head['reference_sizes'] == [8.0, 16.0] and head['bins'] == 2
    np.testing.assert_allclose(head['edges'], [[p3] * 3,
                                               [p4_medium, (p4_medium + p4_large) / 2,
                                                p4_large]])
    # P3: its one detection (on the edges: the upper bin); P4: medium low, large high
    mass = np.zeros((2, 2, 2))
    mass[:, 1, 0] = [.2, .8]
    mass[:, 1, 1] = [.6, .4]
    mass[:, 0, 1] = [.9, .1]
    np.testing.assert_allclose(head['mass'], mass, rtol=1e-6)
    # only P4 has scale entropy: I(E; Q | P4) / H(Q | P4) of [[.9, .6], [.1, .4]]
    joint = mass[:, :, 1] / mass[:, :, 1].sum()
    pe, pq = joint.sum(1), joint.sum(0)
    expected = (joint * np.log(joint / np.outer(pe, pq))).sum() / -(pq * np.log(pq)).sum()
    assert head['nmi_given_level'] == pytest.approx(expected, rel=1e-6)
    # the neck's rows are per image: shuffling within (image, level) changes nothing
    assert neck['shuffled_within_image_level']['mean'] == \
        pytest.approx(neck['nmi_given_level'], abs=1e-12)
    assert hub.get_scalar('val/moe_val/head.nmi_rel_scale_given_level').current() == \
        pytest.approx(expected, rel=1e-6)


def test_the_measure_is_absent_with_its_reason():
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    recorder, samples = batch()

    def measure(hook):
        images = [hook._image_record(b, s, rows_by_layer(recorder))
                  for b, s in enumerate(samples)]
        return hook.summarise(images, 'test', 0, 0)['layers']['head']['relative_scale']
    assert 'before_run' in measure(make_hook(score_thr=0.5))['absent']
    assert 'relative_scale_bins=None' in \
        measure(make_hook(score_thr=0.5, relative_scale_bins=None))['absent']
    hook = make_hook(score_thr=0.5)
    hook._reference_sizes = [8.0, 16.0]
    for s in samples:
        del s.pred_instances.levels
    assert 'does not tag its detections with their FPN level' in measure(hook)['absent']
    with pytest.raises(ValueError, match='relative_scale_bins must be an int >= 2'):
        ExpertSizeStatsHook(relative_scale_bins=1)


def neck_tagged_samples(only_level=None, seed=0):
    """Six images with detections on 3 levels, tagged by a head (every detection) and
    a neck conv that feeds level 2 only (zeros for the others' detections, as the
    dense-head tagging writes them); ``only_level``: keep that level's detections."""
    rng = np.random.default_rng(seed)
    samples = []
    for img_id in range(6):
        levels = np.r_[2, rng.integers(0, 3, 7)]
        sides, labels = rng.uniform(8, 150, len(levels)), rng.integers(0, 2, len(levels))
        keep = levels == only_level if only_level is not None else np.ones(len(levels), bool)
        head = rng.dirichlet(np.ones(3), len(levels))
        neck = np.where((levels == 2)[:, None], rng.dirichlet(np.ones(3), len(levels)), 0)
        s = sample(img_id, [[0, 0, side, side] for side in sides[keep]], [.9] * keep.sum(),
                   labels[keep].tolist(), levels[keep].tolist(),
                   gt_boxes=[[0, 0, 20, 20], [0, 0, 120, 120]], gt_labels=[0, 1])
        s.pred_instances.expert_weights = torch.tensor(
            np.stack([head, neck], axis=1)[keep], dtype=torch.float)
        s.pred_instances.set_metainfo(dict(expert_layers=['head', 'neck']))
        samples.append(s)
    recorder = GateRecorder()
    for level in range(3):
        recorder.add('head', torch.full((6, 3), 1 / 3), level=level)
    recorder.add('neck', torch.full((6, 3), 1 / 3))
    return recorder, samples


def test_a_neck_layer_counts_only_the_detections_of_the_level_it_feeds():
    """Its tables, NMIs, shuffled baselines and intervals are those of the run in
    which only its level's detections exist; the head counts every detection."""
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer

    def stats(only_level):
        hook = make_hook(score_thr=0.5, shuffle_permutations=5, bootstrap_resamples=50)
        recorder, samples = neck_tagged_samples(only_level)
        layers = rows_by_layer(recorder)
        images = [hook._image_record(b, s, layers) for b, s in enumerate(samples)]
        return hook.summarise(images, 'val', 1, 10)

    full, level_2 = stats(None), stats(2)
    neck, alone = full['layers']['neck'], level_2['layers']['neck']
    assert neck['detection_gates'] == 'tagged'
    assert neck['num_detections'] == level_2['num_detections'] < full['num_detections']
    assert full['layers']['head']['num_detections'] == full['num_detections']
    for key in ('detection', 'classes', 'detection_levels', 'nmi_given_level',
                'nmi_shuffled', 'nmi_given_level_shuffled', 'intervals'):
        assert neck[key] == alone[key], key  # the same rows, summed alike
    assert np.array(neck['detection_levels']['mass'])[..., :2].sum() == 0


def test_moe_fpn_under_a_stock_head_gets_detection_and_level_tables():
    """The toy RetinaNet with a MoEFPN and the stock RetinaHead: every neck conv has
    per-detection tables over the detections of its level (each fed row sums to 1,
    so its mass is their number) and the level-controlled view."""
    from helpers import build_model, toy_retinanet
    from mmdet_moe.analysis import layer_summary, validate_stats
    cfg = toy_retinanet()
    cfg.neck.update(type='MoEFPN', moe_parts=['lateral', 'output', 'extra'], num_experts=3)
    model = build_model(cfg).eval()
    hook = ExpertSizeStatsHook(score_thr=0.0, shuffle_permutations=3, bootstrap_resamples=20)
    stats, _, outputs = stats_of_two_images(
        model, hook, lambda inputs, samples: model(inputs, samples, mode='predict'))
    validate_stats(stats)
    levels = torch.cat([s.pred_instances.levels for s in outputs])
    feeds = {**{f'neck.lateral_convs.{i}.conv': i for i in range(3)},
             **{f'neck.fpn_convs.{i}.conv': i for i in range(5)}}
    assert sorted(stats['layers']) == sorted(feeds)
    for name, layer in stats['layers'].items():
        count = int((levels == feeds[name]).sum())
        assert layer['detection_gates'] == 'tagged' and layer['num_detections'] == count
        assert np.sum(layer['detection']['mass']) == pytest.approx(count, rel=1e-5)
        # (levels up to the highest one with a detection)
        per_level = np.array(layer['detection_levels']['mass']).sum((0, 1))
        np.testing.assert_allclose(np.pad(per_level, (0, 5 - len(per_level))),
                                   np.eye(5)[feeds[name]] * count, rtol=1e-5, atol=1e-6)
        assert layer['nmi_given_level'] is not None
        if count:
            assert layer_summary(layer, ['small', 'medium', 'large'])['view'] == 'detection'


def test_untagged_layers_are_said_in_one_line_naming_the_head(tmp_path):
    """A layer whose detections keep per-image rows gets one warning that names the
    detector part and why (here a DETR-family detector: no honest per-detection tag)."""
    from types import SimpleNamespace

    import torch.nn as nn
    from mmdet.models.detectors import DetectionTransformer
    from mmdet_moe.engine.hooks.gate_rows import rows_by_layer
    from mmdet_moe.layers import MoEConv2d
    from mmdet_moe.models import untagged_layers_reason

    class Detr(DetectionTransformer):  # the DETR family's base: no build needed
        def __init__(self):
            nn.Module.__init__(self)

    Detr.__abstractmethods__ = frozenset()
    detr = Detr()
    detr.neck = MoEConv2d(4, 4, 1)
    warnings = []
    runner = SimpleNamespace(
        work_dir=str(tmp_path), epoch=0, iter=0,
        logger=SimpleNamespace(warning=warnings.append),
        message_hub=SimpleNamespace(update_scalar=lambda *args: None))
    hook = make_hook(score_thr=0.5)
    hook._untagged_reason = untagged_layers_reason(detr)  # what before_run finds
    recorder, samples = batch()
    layers = rows_by_layer(recorder)
    hook._images = [hook._image_record(b, s, layers) for b, s in enumerate(samples)]
    hook._dataset = samples
    hook._finish(runner, 'test', 'test', None)
    lines = [w for w in warnings if 'per-image rows' in w]
    assert lines == [
        'ExpertSizeStatsHook: Detr: every query attends to every level, so a detection '
        'draws on all of them: its MoE layers keep per-image rows, the honest tag there; '
        'untagged layers: head, neck']
