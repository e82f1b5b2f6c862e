"""Cascade RPN tags its proposals, and through them the RoI detections: a proposal of
level l carries the (image, level l) gate rows of every MoE layer of every stage (each
stage runs level l on level l's map) and, for a MoE FPN neck, those of the convs that
compute level l (zeros for the others). Boxes, scores and labels are mmdet's. The
independent computation: the gate rows recorded call by call in a run of mmdet's own
``CascadeRPNHead.predict`` (and of the neck), looked up by the level each proposal's
box gives: with both stages' box regression zeroed a proposal is its anchor,
8 × stride wide."""

import pytest
import torch
from mmengine.config import ConfigDict

from helpers import build_model, logged_lines, redraw_parameters, stock_model_cfg
from mmdet.models.dense_heads import CascadeRPNHead
from mmdet_moe.layers import assign_moe_names, is_moe_module, record_gates
from mmdet_moe.models.dense_heads import expert_tagging
from mmdet_moe.models.tag_coverage import untagged_layers_reason

CASCADE_RPN = 'cascade_rpn/cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py'
MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))
# Faster R-CNN's FPN: lateral conv i and output conv i compute level i (P6 is pooled)
NECK_LEVELS = {f'neck.{part}.{i}.conv': i
               for part in ('lateral_convs', 'fpn_convs') for i in range(4)}
STAGE_0_CONV = 'rpn_head.stages.0.rpn_conv.conv'  # stage 1's is a deformable conv


def cascade_rpn(paths=(), neck_moe=False, moe=MOE):
    """mmdet's Cascade RPN Faster R-CNN at width 32, its stages' box regression zeroed,
    MoE layers ``moe`` at ``paths`` and, with ``neck_moe``, ``MOE`` in
    every FPN conv (the census' neck form)."""
    cfg = stock_model_cfg(CASCADE_RPN, 32)
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=30)
    cfg.test_cfg.rcnn.update(score_thr=0.0, max_per_img=50)
    if neck_moe:
        cfg.neck.conv_cfg = dict(type='MoEConv2d', **MOE)
    if paths:
        cfg = ConfigDict(type='MoEDetector', detector=cfg,
                         moe_layers=[dict(moe, paths=list(paths))])
    model = build_model(cfg)
    redraw_parameters(model, seed=4)
    for stage in model.rpn_head.stages:
        torch.nn.init.zeros_(stage.rpn_reg.weight)
        torch.nn.init.zeros_(stage.rpn_reg.bias)
    assign_moe_names(model)  # for direct head calls, as forward does
    return model.eval()


def batch(model):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, [[3, 128, 128]] * 2, num_items=[2, 2], num_classes=5)
    data = model.data_preprocessor(packed, False)
    return data['inputs'], data['data_samples']


def stock_run(model, inputs, samples):
    """The features, mmdet's own proposals and {layer: (calls, B, N)} the gate rows
    recorded in their run (a neck conv runs once, a stage's layer once per level: call
    l on level l's map, checked here by its size)."""
    seen = {}
    stage_layers = [m for m in model.rpn_head.modules() if is_moe_module(m)]
    hooks = [m.register_forward_pre_hook(
        lambda m, args: seen.setdefault(m, []).append(args[0].shape[-2:]))
        for m in stage_layers]
    with record_gates() as recorder, torch.no_grad():
        feats = model.extract_feat(inputs)
        proposals = CascadeRPNHead.predict.__wrapped__(model.rpn_head, feats, samples,
                                                       rescale=False)
    for hook in hooks:
        hook.remove()
    assert all(seen[m] == [f.shape[-2:] for f in feats] for m in stage_layers)
    rows = {name: torch.stack([r.weights for r in sorted(records, key=lambda r: r.call)])
            for name, records in recorder.by_layer().items()}
    return feats, proposals, rows


def expected_tags(rows, names, levels, b):
    """(len(levels), M, N): per layer of ``names``, the gate row of image ``b`` at each
    level of a stage's layer; a neck conv's row where it computes the level, else 0."""
    columns = []
    for name in names:
        if name in NECK_LEVELS:
            fed = (levels == NECK_LEVELS[name]).float()[:, None]
            columns.append(fed * rows[name][0, b])
        else:
            columns.append(rows[name][levels, b])
    return torch.stack(columns, dim=1)


def anchor_levels(bboxes, size=128):
    """The level of each proposal's anchor (8 × 4 · 2^l wide) where no image border
    clipped it, -1 elsewhere."""
    x1, y1, x2, y2 = bboxes.unbind(1)
    inside = (x1 > 0) & (y1 > 0) & (x2 < size) & (y2 < size)
    levels = torch.log2((x2 - x1) / 32).round().long()
    return torch.where(inside, levels, -1)


@pytest.mark.parametrize('paths', [
    [STAGE_0_CONV], ['rpn_head.stages.1.rpn_cls'], [STAGE_0_CONV, 'rpn_head.stages.1.rpn_cls']])
def test_each_proposal_carries_every_stages_gate_row_of_its_level(paths):
    model = cascade_rpn(paths)
    assert untagged_layers_reason(model) is None
    inputs, samples = batch(model)
    feats, stock, rows = stock_run(model, inputs, samples)
    with torch.no_grad():
        tagged = model.rpn_head.predict(feats, samples, rescale=False)
    checked = 0
    for b, (got, want) in enumerate(zip(tagged, stock, strict=True)):
        assert set(want.keys()) == {'bboxes', 'scores', 'labels'}
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        assert got.metainfo['expert_layers'] == paths
        torch.testing.assert_close(got.expert_weights,
                                   expected_tags(rows, paths, got.levels, b))
        known = anchor_levels(got.bboxes) >= 0
        assert torch.equal(got.levels[known], anchor_levels(got.bboxes)[known])
        checked += int(known.sum())
    assert checked > 10


def test_detections_carry_the_neck_and_stage_rows_of_their_proposals_level():
    """The census' neck form and a stage's conv together, through the detector's
    predict: the RoI head keeps each proposal's tags; its detections are mmdet's."""
    model = cascade_rpn([STAGE_0_CONV], neck_moe=True)
    assert untagged_layers_reason(model) is None
    inputs, samples = batch(model)
    feats, proposals, rows = stock_run(model, inputs, samples)
    with torch.no_grad():
        stock = model.roi_head.predict(feats, proposals, samples, rescale=True)
        tagged = [s.pred_instances for s in model(inputs, samples, mode='predict')]
    assert sum(map(len, stock)) > 0
    for b, (got, want) in enumerate(zip(tagged, stock, strict=True)):
        assert 'expert_weights' not in want
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        names = got.metainfo['expert_layers']
        assert names == [STAGE_0_CONV, *NECK_LEVELS]
        assert ((got.levels >= 0) & (got.levels < 5)).all()
        torch.testing.assert_close(got.expert_weights,
                                   expected_tags(rows, names, got.levels, b))


def test_without_moe_the_proposals_and_detections_are_mmdets():
    model = cascade_rpn()
    inputs, samples = batch(model)
    feats, proposals, _ = stock_run(model, inputs, samples)
    with torch.no_grad():
        got = model.rpn_head.predict(feats, samples, rescale=False)
        detections = model(inputs, samples, mode='predict')
    for mine, theirs in zip(got, proposals, strict=True):
        assert set(mine.keys()) == set(theirs.keys()) == {'bboxes', 'scores', 'labels'}
        for key in theirs.keys():
            assert torch.equal(mine[key], theirs[key])
    assert all('expert_weights' not in d.pred_instances for d in detections)


def test_per_pixel_gates_leave_the_proposals_untagged_with_one_log_line(monkeypatch):
    """The decode keeps no prior index, so a per-pixel gate cannot be read at a
    proposal's location: predict still runs, untagged, and says so once."""
    monkeypatch.setattr(expert_tagging, '_PIXEL_UNDER_RPN', set())
    model = cascade_rpn(['neck.fpn_convs.0.conv'], moe=dict(
        type='CPMuMoEConv2d', num_experts=4, gate_mode='pixel', norm=None))
    inputs, samples = batch(model)
    with logged_lines() as messages, torch.no_grad():
        for _ in range(2):
            detections = model(inputs, samples, mode='predict')
    assert all('expert_weights' not in d.pred_instances for d in detections)
    lines = [m for m in messages if 'per-pixel gates' in m]
    assert lines == ["CascadeRPNHead keeps no prior indices: the per-pixel gates of "
                     "['neck.fpn_convs.0.conv'] cannot be tagged in its proposals, which "
                     "keep per-image rows; use a per-image gate there (gate_mode='image')"]
    assert untagged_layers_reason(model) == (
        f'{type(model).__name__}: CascadeRPNHead keeps no prior indices: the per-pixel '
        "gates of 1 MoE module(s) cannot be read at a proposal's location: those layers "
        'keep per-image rows')
