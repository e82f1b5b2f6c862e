"""A MoE FPN neck tags the detections of the levels it computes: each neck MoE
module's column of ``expert_weights`` holds the gate row (per-pixel gates: the vector
at the detection's prior) of the level it feeds, zeros for other levels' detections,
after the head's own columns; boxes, scores and labels are those of the untagged
predict. The independent computation: the gate records of a plain forward and the
levels each conv feeds, written out by hand below."""
import pytest
import torch
from mmengine.config import ConfigDict

from helpers import build_model, logged_lines, redraw_parameters, stock_model_cfg
from mmdet_moe.layers import record_gates
from mmdet_moe.models.necks.neck_tagging import fed_level, tagged_neck_modules
from mmdet_moe.models.tag_coverage import untagged_layers_reason

WIDTH = 32
MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
RETINANET = 'retinanet/retinanet_r50_fpn_1x_coco.py'
# the stock RetinaNet FPN: 3 laterals (C3-C5), 3 output convs, 2 extra convs (P6, P7)
FPN_LEVELS = {**{f'neck.lateral_convs.{i}.conv': i for i in range(3)},
              **{f'neck.fpn_convs.{i}.conv': i for i in range(5)}}
# PAFPN adds the bottom-up path: downsample_convs[i] and pafpn_convs[i] make level i + 1
PAFPN_LEVELS = {**FPN_LEVELS, **{f'neck.downsample_convs.{i}.conv': i + 1 for i in range(2)},
                **{f'neck.pafpn_convs.{i}.conv': i + 1 for i in range(2)}}
NECKS = {
    'moe-fpn': (dict(type='MoEFPN', moe_parts=['lateral', 'output', 'extra'], **MOE),
                FPN_LEVELS),
    'pafpn-by-conv-cfg': (dict(type='PAFPN', conv_cfg=dict(type='MoEConv2d', **MOE)),
                          PAFPN_LEVELS),
}


def detector(path=RETINANET, neck=None, moe_layers=None, seed=2):
    cfg = stock_model_cfg(path, WIDTH)
    if neck is not None:
        cfg.neck.update(neck)
    if moe_layers is not None:
        cfg = ConfigDict(type='MoEDetector', detector=cfg, moe_layers=moe_layers)
    model = build_model(cfg)
    redraw_parameters(model, seed=seed)
    return model.eval()


def batch(model):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, [[3, 128, 160], [3, 96, 128]], num_items=[2, 2], num_classes=5)
    data = model.data_preprocessor(packed, False)
    return data['inputs'], data['data_samples']


def gate_rows(model, inputs, run_head=True):
    """{layer: (calls, B, N)} the gate rows of a plain forward (a head's calls are its
    levels, in order; a neck conv runs once)."""
    with record_gates(model) as recorder, torch.no_grad():
        feats = model.extract_feat(inputs)
        if run_head:
            model.bbox_head(feats)
    return {name: torch.stack([r.weights for r in sorted(records, key=lambda r: r.call)])
            for name, records in recorder.by_layer().items()}


def expected_tags(rows, names, neck_levels, levels, b):
    """(num_dets, M, N): a head layer's row of the detection's level; a neck layer's
    row where it feeds the detection's level, else zeros."""
    columns = []
    for name in names:
        if name in neck_levels:
            fed = (levels == neck_levels[name])[:, None]
            columns.append(torch.where(fed, rows[name][0, b], 0.))
        else:
            columns.append(rows[name][levels, b])
    return torch.stack(columns, dim=1)


def test_the_convs_that_feed_a_level():
    assert fed_level('lateral_convs.2.conv') == 2 and fed_level('fpn_convs.4') == 4
    assert fed_level('downsample_convs.0.conv') == 1 and fed_level('pafpn_convs.2.conv') == 3
    assert fed_level('fpn_convs') is None and fed_level('attention.1.conv') is None
    assert tagged_neck_modules(torch.nn.Conv2d(1, 1, 1)) == {}


@pytest.mark.parametrize('name', sorted(NECKS))
def test_neck_tags_each_detection_with_its_levels_convs(name):
    neck, levels = NECKS[name]
    model = detector(neck=neck)
    inputs, samples = batch(model)
    with torch.no_grad():
        # mmdet's own predict, no neck recording (the samples get their predictions:
        # keep them before the next call)
        untagged = [s.pred_instances for s in model.predict(inputs, samples)]
        tagged = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    rows = gate_rows(model, inputs, run_head=False)
    for b, (got, want) in enumerate(zip(tagged, untagged, strict=True)):
        assert set(want.keys()) == {'bboxes', 'scores', 'labels'}
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key])
        names = got.metainfo['expert_layers']
        assert sorted(names) == sorted(levels)
        torch.testing.assert_close(got.expert_weights,
                                   expected_tags(rows, names, levels, got.levels, b))
        # every detection is fed by its level's output conv at least
        assert ((got.expert_weights.sum(-1) > 0).sum(1) >= 1).all()


def test_head_columns_come_first_then_the_necks():
    head = 'bbox_head.cls_convs.1.conv'
    model = detector(neck=NECKS['moe-fpn'][0], moe_layers=[dict(paths=[head], **MOE)])
    inputs, samples = batch(model)
    with torch.no_grad():
        tagged = model(inputs, samples, mode='predict')
    rows = gate_rows(model, inputs)
    for b, sample in enumerate(tagged):
        pred = sample.pred_instances
        names = pred.metainfo['expert_layers']
        assert names == [head, *FPN_LEVELS]
        torch.testing.assert_close(pred.expert_weights,
                                   expected_tags(rows, names, FPN_LEVELS, pred.levels, b))


def test_per_pixel_neck_gates_tag_each_detection_with_its_location():
    """μMoE output convs with per-pixel gates: a detection's column is the gate vector
    at its anchor on its level. With the regression output zeroed every box is its
    anchor (one square anchor of side stride per location), so the level
    (log2(side / 8)) and the location (centre / stride) are known without the decode."""
    cfg = stock_model_cfg(RETINANET, WIDTH)
    cfg.bbox_head.anchor_generator.update(octave_base_scale=1, scales_per_octave=1,
                                          ratios=[1.0])
    cfg.test_cfg.update(score_thr=0.0, nms_pre=50, max_per_img=100)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths='neck.fpn_convs.*.conv', type='CPMuMoEConv2d', num_experts=6,
             gate_mode='pixel', gate_act='softmax', norm=None)]))
    redraw_parameters(model, seed=3)
    head = model.eval().bbox_head
    torch.nn.init.zeros_(head.retina_reg.weight)
    torch.nn.init.zeros_(head.retina_reg.bias)
    inputs, samples = batch(model)
    with record_gates(model) as recorder, torch.no_grad():
        model.extract_feat(inputs)
        results = model(inputs, samples, mode='predict')
    maps = {r.name: r.pixel_weights for r in recorder.records[:5]}  # extract_feat's
    checked = 0
    for b, (result, sample) in enumerate(zip(results, samples)):
        pred = result.pred_instances
        names = pred.metainfo['expert_layers']
        assert names == [f'neck.fpn_convs.{i}.conv' for i in range(5)]
        height, width = sample.metainfo['img_shape']
        # forward(mode='predict') rescales the boxes to the original image
        boxes = pred.bboxes * pred.bboxes.new_tensor(sample.metainfo['scale_factor']).repeat(2)
        for box, level, weights in zip(boxes, pred.levels, pred.expert_weights):
            x1, y1, x2, y2 = box.tolist()
            if x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height:
                continue  # clipped to the image: its centre is not the anchor's
            stride = round(x2 - x1)
            assert level == round(torch.log2(torch.tensor(stride / 8)).item())
            x, y = round((x1 + x2) / 2 / stride), round((y1 + y2) / 2 / stride)
            for m, name in enumerate(names):
                want = (maps[name][b, :, y, x] if m == level
                        else torch.zeros_like(weights[m]))
                torch.testing.assert_close(weights[m], want)
            checked += 1
    assert checked > 20


def test_two_stage_detections_carry_their_proposals_neck_tags():
    """Faster R-CNN's RPN tags each proposal with the neck rows of its level (its
    FPN has 4 output convs; P6 is max-pooled, no conv of its own), and the RoI
    detections keep their proposal's tags and level (the RoI head has no MoE)."""
    model = detector('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                     neck=dict(type='MoEFPN', moe_parts='output', **MOE), seed=4)
    model.test_cfg.rcnn.update(score_thr=0.0, max_per_img=50)
    inputs, samples = batch(model)
    with torch.no_grad():
        untagged = [s.pred_instances for s in model.predict(inputs, samples)]
        tagged = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    rows = gate_rows(model, inputs, run_head=False)
    levels = {f'neck.fpn_convs.{i}.conv': i for i in range(4)}
    for b, (got, want) in enumerate(zip(tagged, untagged, strict=True)):
        assert len(want) > 0
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(got[key], want[key])
        names = got.metainfo['expert_layers']
        assert names == list(levels)
        torch.testing.assert_close(got.expert_weights,
                                   expected_tags(rows, names, levels, got.levels, b))


def test_per_pixel_neck_gates_under_an_rpn_leave_proposals_untagged_with_a_log_line(
        monkeypatch):
    """The RPN keeps its own top-k, no prior index: a per-pixel neck gate cannot be
    read at a proposal's location. The prediction must not fail (it raised): the
    proposals and detections stay untagged, and one line says which layer and what
    would do, as under a Cascade RPN."""
    from mmdet_moe.models.dense_heads import expert_tagging
    monkeypatch.setattr(expert_tagging, '_PIXEL_UNDER_RPN', set())
    cfg = stock_model_cfg('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', WIDTH)
    model = build_model(ConfigDict(type='MoEDetector', detector=cfg, moe_layers=[
        dict(paths='neck.fpn_convs.0.conv', type='CPMuMoEConv2d', num_experts=4,
             gate_mode='pixel', norm=None)])).eval()
    inputs, samples = batch(model)
    with logged_lines() as messages, torch.no_grad():
        detections = [model(inputs, samples, mode='predict') for _ in range(2)][-1]
    assert all('expert_weights' not in d.pred_instances for d in detections)
    assert [m for m in messages if 'per-pixel gates' in m] == [
        "RPNHead keeps no prior indices: the per-pixel gates of ['neck.fpn_convs.0.conv'] "
        "cannot be tagged in its proposals, which keep per-image rows; use a per-image "
        "gate there (gate_mode='image')"]
    # the statistics hook and the census say it too, before any prediction
    assert untagged_layers_reason(model) == (
        'FasterRCNN: RPNHead keeps no prior indices: the per-pixel gates of 1 MoE '
        'module(s) cannot be read at a proposal\'s location: those layers keep '
        'per-image rows')
